"""How close two computations of the same statistics and subspaces must be.

K/V gradients are float32: another batching, shard split or thread count rounds them otherwise,
and moves the sufficient statistics by up to ~1e-5 of their norm (the testbed model, 8 to 50
calibration texts, 1 to 3 threads, one pass or two shards: at most 9.6e-6). The subspace then
moves by at most what Davis-Kahan allows (the form of Yu, Wang & Samworth 2015):
||P - Q||_2 = ||sin Theta||_2 <= 2 ||E||_2 / (lambda_r - lambda_{r+1}), with E the perturbation
of the centred G^T G, here ||E||_2 <= rel * lambda_1. A near-degenerate cut at rank r (a small
eigengap) lets rounding alone turn the subspace: there only the statistics can be compared.
"""

from __future__ import annotations

import math
import warnings

import torch

F32_REL = 5e-5  # statistics of float32 gradients along two paths: 5x the 9.6e-6 measured
F64_REL = 1e-12  # statistics of float64 rows (m * eps64 for a few hundred rows, with margin)


def _norm(x: torch.Tensor) -> float:
    return float(torch.linalg.norm(x.double(), 2))  # spectral for a matrix, Euclidean for a vector


def assert_stats_close(got: dict, want: dict, rel: float = F32_REL) -> None:
    """The same rows (count), sum g g^T and sum g to `rel` of their norm, for every (layer, K|V)."""
    assert got.keys() == want.keys()
    for key, w in want.items():
        g = got[key]
        assert g.count == w.count, f"{key}: {g.count} rows, not {w.count}"
        for name, a, b in (("sum g g^T", g.gram, w.gram), ("sum g", g.total, w.total)):
            err = _norm(a - b) / _norm(b)
            assert err <= rel, f"{key} {name}: off by {err:.1e} of its norm (allowed {rel:.0e})"


def assert_projectors_close(p: torch.Tensor, q: torch.Tensor, eigvals: torch.Tensor, rank: int,
                            rel: float = F32_REL, name: str = "projectors") -> bool:
    """||P - Q||_2 within the Davis-Kahan bound 2 rel lambda_1 / (lambda_r - lambda_{r+1}), for
    projectors from statistics `rel` apart; `eigvals`: the spectrum of the centred G^T G
    (descending). False, with a warning that says why, where the bound is vacuous (>= 1, which
    any two rank-r projectors meet): then the projectors are not compared."""
    ev = eigvals.double()
    gap = float(ev[rank - 1] - (ev[rank] if rank < len(ev) else 0.0))
    bound = 2 * rel * float(ev[0]) / gap if gap > 0 else math.inf
    if bound >= 1:
        warnings.warn(f"{name} at rank {rank} not compared: the eigengap there is "
                      f"{gap / float(ev[0]):.1e} of lambda_1, so a {rel:.0e} change of the "
                      f"statistics can turn the subspace (Davis-Kahan bound {bound:.2g} >= 1)",
                      stacklevel=2)
        return False
    assert torch.trace(p.double()).round() == torch.trace(q.double()).round() == rank
    err = _norm(p - q)
    assert err <= bound, f"{name}: ||P - Q||_2 = {err:.2e} > {bound:.2e} (Davis-Kahan, gap {gap:.2e})"
    return True


def assert_subspaces_close(got, want, rel: float = F32_REL) -> None:
    """`assert_projectors_close` for every (layer, K|V) of two CapabilitySubspaces, on the
    spectrum `want` was cut from. Where the cut at the subspace's rank is near-degenerate (on
    testbed v2.2, every layer and kind at half rank, eigengaps of 1e-7 to 1e-4 of lambda_1), the
    leading directions are compared instead, at the largest rank whose eigengap makes the bound
    informative, so that every pair is compared at some rank."""
    assert got.bases.keys() == want.bases.keys()
    for key, basis in want.bases.items():
        ev, name = want.singular_values[key] ** 2, f"layer {key[0]} {key[1].upper()} projectors"
        for rank in range(basis.shape[1], 0, -1):
            b, c = got.bases[key][:, :rank], basis[:, :rank]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore" if rank < basis.shape[1] else "default")
                if assert_projectors_close(b @ b.T, c @ c.T, ev, rank, rel, name=f"{name} (top {rank})"):
                    break
        else:
            raise AssertionError(f"{name}: no rank with an informative Davis-Kahan bound")
