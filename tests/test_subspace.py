"""The subspace from sufficient statistics equals the SVD of the stacked gradients (Eqs. 8-10)."""

from __future__ import annotations

import math
import os
import stat

import pytest
import torch

from spd_ray.core.subspace import (
    CapabilitySubspace,
    SufficientStats,
    build_subspace,
    compute_basis,
    random_subspace,
)
from tests.tolerances import F64_REL, assert_projectors_close


def gradients(m: int = 200, d: int = 16, seed: int = 0) -> torch.Tensor:
    """Rows with a decaying spectrum (a clear gap at every rank) and a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, d, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (torch.randn(m, d, generator=g, dtype=torch.float64) * scales) @ q.T + 0.3 * q[:, 0]


def stats_of(g: torch.Tensor) -> SufficientStats:
    return SufficientStats.zeros(g.shape[1]).update(g)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("rank", [1, 5, 8, 16])
def test_basis_equals_svd_of_stacked_rows(center, rank):
    g = gradients()
    basis, s, energy = compute_basis(stats_of(g), "fixed", rank, center=center, dtype=torch.float64)
    x = g - g.mean(0) if center else g
    _, s_ref, vh = torch.linalg.svd(x, full_matrices=False)
    v = vh[:rank].T
    assert assert_projectors_close(basis @ basis.T, v @ v.T, s_ref**2, rank, rel=F64_REL)
    torch.testing.assert_close(s, s_ref, atol=1e-8, rtol=1e-8)
    assert energy == pytest.approx(float((s_ref[:rank] ** 2).sum() / (s_ref**2).sum()))
    torch.testing.assert_close(basis.T @ basis, torch.eye(rank, dtype=torch.float64))


def test_default_is_half_rank_float32_and_reproducible_signs():
    g = gradients(d=12)
    basis, s, _ = compute_basis(stats_of(g))
    assert basis.shape == (12, 6) and basis.dtype == torch.float32 and s.dtype == torch.float64
    assert torch.all(s[:-1] >= s[1:])
    again, _, _ = compute_basis(stats_of(g.flip(0)))  # same rows, other order
    torch.testing.assert_close(basis, again, atol=1e-6, rtol=0)
    top = basis.abs().argmax(0)
    assert torch.all(basis[top, torch.arange(6)] > 0)


def test_shards_summed_equal_one_pass():
    g = gradients()
    shards = [stats_of(g[:50]), stats_of(g[50:120]), stats_of(g[120:])]
    merged = SufficientStats.from_dict(shards[0].to_dict()) + shards[1] + shards[2]
    one = stats_of(g)
    assert merged.count == one.count == 200
    torch.testing.assert_close(merged.gram, one.gram)
    b1, s1, _ = compute_basis(merged, dtype=torch.float64)
    b2, s2, _ = compute_basis(one, dtype=torch.float64)
    assert assert_projectors_close(b1 @ b1.T, b2 @ b2.T, s2**2, b2.shape[1], rel=F64_REL)
    torch.testing.assert_close(s1, s2)


def test_energy_mode_picks_smallest_rank():
    g = gradients()
    _, s, _ = compute_basis(stats_of(g), dtype=torch.float64)
    frac = torch.cumsum(s**2, 0) / (s**2).sum()
    for target in (0.5, 0.9, 0.99, 1.0):
        basis, _, captured = compute_basis(stats_of(g), "energy", energy=target)
        r = basis.shape[1]
        assert captured >= target - 1e-9
        assert r == 1 or frac[r - 2] < target  # one fewer would not reach it
    assert compute_basis(stats_of(g), "energy", energy=1.0)[0].shape[1] == 16


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"rank_mode": "fixed", "rank": 17}, ["kv_dim = 16", "1..16"]),
        ({"rank_mode": "fixed", "rank": 0}, ["1..16"]),
        ({"rank_mode": "fixed"}, ["needs a rank"]),
        ({"rank_mode": "energy", "energy": 0.0}, ["(0, 1]"]),
        ({"rank_mode": "energy", "energy": 1.5}, ["(0, 1]"]),
        ({"rank_mode": "top"}, ["half", "fixed", "energy"]),
    ],
)
def test_bad_rank_arguments(kwargs, words):
    with pytest.raises(ValueError) as err:
        compute_basis(stats_of(gradients()), **kwargs)
    for w in words:
        assert w in str(err.value)


def test_non_finite_and_empty_statistics():
    with pytest.raises(ValueError, match="non-finite.*float32 or bfloat16"):
        SufficientStats.zeros(4).update(torch.tensor([[1.0, float("inf"), 0.0, 0.0]]))
    with pytest.raises(ValueError, match="no gradient rows"):
        compute_basis(SufficientStats.zeros(4))
    with pytest.raises(ValueError, match="dimension 4 and 5"):
        SufficientStats.zeros(4) + SufficientStats.zeros(5)


def build() -> CapabilitySubspace:
    stats = {
        (3, "k"): stats_of(gradients(seed=1)),
        (3, "v"): stats_of(gradients(seed=2)),
        (1, "k"): stats_of(gradients(seed=3)),
        (1, "v"): stats_of(gradients(seed=4)),
    }
    return build_subspace(stats, rank_mode="half", meta={"model": "tiny"})


def test_save_load_round_trip(tmp_path):
    sub = build()
    assert sub.layers == [1, 3] and sub.meta["ranks"]["layer3.k"] == 8
    sub.save(tmp_path / "s")
    back = CapabilitySubspace.load(tmp_path / "s")
    assert back.meta == sub.meta and back.energy == sub.energy
    for key in sub.bases:
        torch.testing.assert_close(back.bases[key], sub.bases[key], atol=0, rtol=0)
        torch.testing.assert_close(back.singular_values[key], sub.singular_values[key])
    p = back.projector(3, "v")
    torch.testing.assert_close(p @ p, p, atol=1e-6, rtol=0)
    torch.testing.assert_close(p, p.T)
    with pytest.raises(FileNotFoundError, match="subspace.safetensors"):
        CapabilitySubspace.load(tmp_path / "nothing")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_have_the_mode_the_umask_gives_any_file(tmp_path, umask):
    old = os.umask(umask)
    try:
        build().save(tmp_path)
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in tmp_path.iterdir()}
    assert modes == {"subspace.safetensors": 0o666 & ~umask, "subspace.json": 0o666 & ~umask}


def test_random_subspace_is_orthonormal_with_same_ranks(tmp_path):
    sub = build()
    rnd = random_subspace(sub, seed=7)
    assert rnd.bases.keys() == sub.bases.keys()
    for key, b in rnd.bases.items():
        assert b.shape == sub.bases[key].shape and b.dtype == sub.bases[key].dtype
        torch.testing.assert_close(b.T @ b, torch.eye(b.shape[1]), atol=1e-6, rtol=0)
        assert math.isnan(rnd.energy[key])
        # not the gradient subspace: the projectors differ
        assert (rnd.projector(*key) - sub.projector(*key)).abs().max() > 0.1
    torch.testing.assert_close(random_subspace(sub, 7).bases[(1, "k")], rnd.bases[(1, "k")])
    assert not torch.equal(random_subspace(sub, 8).bases[(1, "k")], rnd.bases[(1, "k")])
    rnd.save(tmp_path / "r")
    assert CapabilitySubspace.load(tmp_path / "r").meta["random_subspace_seed"] == 7
