"""The capability subspace (paper Eqs. 8-10) from sufficient statistics of the gradient rows.

The right singular vectors of the stacked gradients G (M x d) are the eigenvectors of G^T G, and
the mean-centred version is G^T G - M mu mu^T. So sum(g g^T), sum(g) and M, summed over examples
and workers, give exactly the SVD subspace in O(d^2) memory.

Also the geometry the report reads: cumulative energy of a spectrum, principal angles and
overlaps between subspaces.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from spd_ray.config import RankMode, SubspaceConfig

RANK_MODES = typing.get_args(RankMode)


@dataclass
class SufficientStats:
    gram: torch.Tensor  # d x d float64, sum g g^T
    total: torch.Tensor  # d float64, sum g
    count: int = 0  # rows M

    @classmethod
    def zeros(cls, d: int) -> SufficientStats:
        return cls(torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64), 0)

    @property
    def dim(self) -> int:
        return self.total.shape[0]

    def update(self, rows: torch.Tensor) -> SufficientStats:
        """Add gradient rows (m x d); returns self."""
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape (m, {self.dim}), got {tuple(rows.shape)}")
        rows = rows.detach().to("cpu", torch.float64)
        if not torch.isfinite(rows).all():
            raise ValueError(
                "gradients are non-finite (e.g. fp16 overflow): compute the calibration "
                "gradients in float32 or bfloat16"
            )
        self.gram += rows.T @ rows
        self.total += rows.sum(0)
        self.count += rows.shape[0]
        return self

    def __add__(self, other: SufficientStats) -> SufficientStats:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {self.dim} and {other.dim}")
        return SufficientStats(
            self.gram + other.gram, self.total + other.total, self.count + other.count
        )

    def to_dict(self) -> dict:
        return {"gram": self.gram.clone(), "total": self.total.clone(), "count": int(self.count)}

    @classmethod
    def from_dict(cls, d: dict) -> SufficientStats:
        return cls(d["gram"].to(torch.float64), d["total"].to(torch.float64), int(d["count"]))


def cumulative_energy(s2: torch.Tensor) -> torch.Tensor:
    """Fraction of the total energy in the first 1, 2, ... directions, from the squared singular
    values (descending)."""
    return torch.cumsum(s2, 0) / s2.sum()


def _rank(s2: torch.Tensor, d: int, rank_mode: str, rank: int | None, energy: float) -> int:
    if rank_mode == "half":
        return max(1, d // 2)
    if rank_mode == "fixed":
        if rank is None or not 1 <= rank <= d:
            raise ValueError(f"rank_mode=fixed needs a rank in 1..{d} (kv_dim = {d}), got {rank}")
        return int(rank)
    if rank_mode == "energy":
        if not 0 < energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        frac = cumulative_energy(s2)
        # small slack so energy=1.0 is reachable despite rounding
        return min(d, int((frac < energy - 1e-12).sum()) + 1)
    raise ValueError(f"unknown rank_mode {rank_mode!r}: use one of {', '.join(RANK_MODES)}")


def compute_basis(
    stats: SufficientStats,
    rank_mode: str = SubspaceConfig.rank_mode,
    rank: int | None = None,
    energy: float = SubspaceConfig.energy,
    center: bool = SubspaceConfig.center,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Top-r right singular vectors of the (centred) stacked gradients: (basis d x r, S, energy)."""
    if stats.count == 0:
        raise ValueError("no gradient rows were accumulated: the calibration set gave no tokens")
    scatter = stats.gram.to(torch.float64)
    if center:  # the authors' code mean-centres the rows of G before the SVD
        mu = stats.total.to(torch.float64) / stats.count
        scatter = scatter - stats.count * torch.outer(mu, mu)
    scatter = (scatter + scatter.T) / 2
    evals, evecs = torch.linalg.eigh(scatter)
    evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)  # descending
    if evals.sum() <= 0:
        raise ValueError(
            "all gradient rows are zero (after centring): the subspace is undefined; "
            "check that the calibration labels mark correctness tokens"
        )
    d = evals.shape[0]
    r = _rank(evals, d, rank_mode, rank, energy)
    # sign convention: the largest-|entry| of each vector is positive, for reproducible bases
    signs = torch.sign(evecs[evecs.abs().argmax(0), torch.arange(d)])
    evecs = evecs * torch.where(signs == 0, 1.0, signs)
    captured = float(evals[:r].sum() / evals.sum())
    return evecs[:, :r].to(dtype).contiguous(), evals.sqrt(), captured


@dataclass
class CapabilitySubspace:
    bases: dict[tuple[int, str], torch.Tensor]  # (layer, "k"|"v") -> d x r orthonormal
    singular_values: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    energy: dict[tuple[int, str], float] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def projector(self, layer: int, kind: str) -> torch.Tensor:
        """P = V_r V_r^T (d x d, symmetric, idempotent)."""
        v = self.bases[(layer, kind)]
        return v @ v.T

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.bases})

    def save(self, directory: str | Path) -> None:
        """Write `subspace.safetensors` (bases, singular values) and `subspace.json` (ranks,
        energies, meta) into `directory`, made if missing; `load` reads them back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, keys = {}, {}
        for (layer, kind), basis in sorted(self.bases.items()):
            name = f"layer{layer}.{kind}"
            tensors[f"{name}.basis"] = basis.contiguous()
            if (layer, kind) in self.singular_values:
                tensors[f"{name}.singular_values"] = self.singular_values[
                    (layer, kind)
                ].contiguous()
            keys[name] = {
                "rank": basis.shape[1],
                "kv_dim": basis.shape[0],
                "energy": self.energy.get((layer, kind)),
            }
        # bytes written here, not save_file: it writes through a private temp file (mode 0600)
        (directory / "subspace.safetensors").write_bytes(save(tensors))
        (directory / "subspace.json").write_text(
            json.dumps({"meta": self.meta, "keys": keys}, indent=1, default=str)
        )

    @classmethod
    def load(cls, directory: str | Path) -> CapabilitySubspace:
        """The subspace that `save` wrote into `directory`."""
        directory = Path(directory)
        for name in ("subspace.safetensors", "subspace.json"):
            if not (directory / name).exists():
                raise FileNotFoundError(
                    f"no saved capability subspace in {directory}: missing {name}"
                )
        tensors = load_file(str(directory / "subspace.safetensors"))
        info = json.loads((directory / "subspace.json").read_text())
        out = cls({}, meta=info.get("meta", {}))
        for name, entry in info["keys"].items():
            layer, kind = int(name.split(".")[0].removeprefix("layer")), name.split(".")[1]
            out.bases[(layer, kind)] = tensors[f"{name}.basis"]
            if f"{name}.singular_values" in tensors:
                out.singular_values[(layer, kind)] = tensors[f"{name}.singular_values"]
            if entry.get("energy") is not None:
                out.energy[(layer, kind)] = float(entry["energy"])
        return out


def build_subspace(
    stats: dict[tuple[int, str], SufficientStats],
    *,
    rank_mode: str = SubspaceConfig.rank_mode,
    rank: int | None = None,
    energy: float = SubspaceConfig.energy,
    center: bool = SubspaceConfig.center,
    meta: dict | None = None,
) -> CapabilitySubspace:
    """One subspace per (layer, K|V) from accumulated statistics; records ranks in meta."""
    out = CapabilitySubspace({}, meta=dict(meta or {}))
    for key in sorted(stats):
        basis, s, captured = compute_basis(stats[key], rank_mode, rank, energy, center)
        out.bases[key], out.singular_values[key], out.energy[key] = basis, s, captured
    out.meta.update(
        rank_mode=rank_mode,
        energy_target=energy,
        center=center,
        ranks={f"layer{k[0]}.{k[1]}": b.shape[1] for k, b in sorted(out.bases.items())},
        rows={f"layer{k[0]}.{k[1]}": stats[k].count for k in sorted(stats)},
    )
    return out


def random_subspace(like: CapabilitySubspace, seed: int) -> CapabilitySubspace:
    """Random orthonormal bases of the same ranks (the random-subspace ablation)."""
    gen = torch.Generator().manual_seed(seed)
    bases = {}
    for key, basis in sorted(like.bases.items()):
        d, r = basis.shape
        q, rr = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))
        bases[key] = (q * torch.sign(torch.diagonal(rr))).to(basis.dtype).contiguous()
    # no gradient energy is known for a random basis
    return CapabilitySubspace(
        bases,
        {k: v.clone() for k, v in like.singular_values.items()},
        {k: math.nan for k in bases},
        {**like.meta, "random_subspace_seed": seed},
    )


# ---------------------------------------------------------------- geometry between subspaces


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees, ascending) between the column spans of orthonormal a and b."""
    # re-orthonormalise in float64: arccos turns a float32 basis's 1e-7 error into ~0.03 degrees
    a, b = torch.linalg.qr(a.to(torch.float64)).Q, torch.linalg.qr(b.to(torch.float64)).Q
    s = torch.linalg.svdvals(a.T @ b).clamp(0, 1)
    return torch.rad2deg(torch.arccos(s))  # svdvals is descending, so the angles ascend


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cos^2 of the principal angles: 1 for identical spans, 0 for orthogonal ones."""
    m = a.to(torch.float64).T @ b.to(torch.float64)
    return float((m**2).sum() / min(a.shape[1], b.shape[1]))


def chance_overlap(d: int, r1: int, r2: int) -> float:
    """Expected overlap of a random r-dim subspace with a fixed one: E||a^T b||^2 = r1 r2 / d."""
    return max(r1, r2) / d
