"""Intervals for the comparison: a bootstrap over items and seeds, and paired differences.

An arm's result is a 0/1 matrix, one row per seed, one column per evaluation item (the same items,
in the same order, for every arm). A bootstrap replicate draws the items with replacement once,
for every arm alike (so differences are paired item by item), and each arm's seeds with
replacement (jointly for two arms that ran the same seeds: their sampling noise is shared). An
arm without seeds (greedy base model) is one row and needs no seed draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

REPLICATES = 2000
# two-sided 5% test with 80% power: the smallest true difference a design detects is about
# (1.96 + 0.84) standard errors of its estimate
MDE_FACTOR = 2.8


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    se: float  # the bootstrap standard error

    @property
    def mde(self) -> float:
        """The smallest difference this design would detect (80% power, 5% two-sided)."""
        return MDE_FACTOR * self.se

    def verdict(self) -> str:
        """Above 0, below 0, or containing it: the pre-registered decision rule's three outcomes."""
        return "confirmed" if self.low > 0 else "refuted" if self.high < 0 else "inconclusive"

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def as_matrix(rows: list[str] | list[list[int]]) -> torch.Tensor:
    """Seeds x items as float, from per-seed strings of 0/1 (EvalResult.correct) or lists; every
    seed must have scored the same number of items."""
    vals = [[int(c) for c in r] for r in rows]
    if not vals or len({len(v) for v in vals}) != 1:
        raise ValueError(f"expected one row of equal length per seed, got lengths {[len(v) for v in vals]}")
    return torch.tensor(vals, dtype=torch.float64)


def _draws(n_items: int, seeds: list[int], generator: torch.Generator, b: int) -> tuple:
    items = torch.randint(n_items, (b, n_items), generator=generator)
    picks = [torch.randint(s, (b, s), generator=generator) for s in seeds]
    return items, picks


def _replicate_means(m: torch.Tensor, items: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Mean of `m` (seeds x items) in each replicate: its items' columns, its seeds' rows."""
    per_seed = m[:, items].mean(-1)  # seeds x B
    return per_seed.gather(0, seeds.T).mean(0)  # B


def _interval(point: float, reps: torch.Tensor) -> Interval:
    low, high = torch.quantile(reps, torch.tensor([0.025, 0.975], dtype=reps.dtype)).tolist()
    return Interval(point, low, high, float(reps.std()))


def mean_interval(m: torch.Tensor, replicates: int = REPLICATES, seed: int = 0) -> Interval:
    """The accuracy (mean over seeds and items) with its 95% percentile interval."""
    g = torch.Generator().manual_seed(seed)
    items, (seeds,) = _draws(m.shape[1], [m.shape[0]], g, replicates)
    return _interval(float(m.mean()), _replicate_means(m, items, seeds))


def paired_difference(a: torch.Tensor, b: torch.Tensor, replicates: int = REPLICATES,
                      seed: int = 0) -> Interval:
    """mean(a) - mean(b) on the same items, with its 95% interval. Seeds are drawn jointly where
    both arms have the same number of seed rows (the same seeds, in order), else separately."""
    return _interval(float(a.mean() - b.mean()), paired_replicates(a, b, replicates, seed))


def paired_replicates(a: torch.Tensor, b: torch.Tensor, replicates: int = REPLICATES,
                      seed: int = 0) -> torch.Tensor:
    """The bootstrap replicates of mean(a) - mean(b) that `paired_difference` summarizes: for
    other intervals (e.g. the 90% one of an equivalence test) and p-values."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired arms must score the same items: {a.shape[1]} vs {b.shape[1]}")
    g = torch.Generator().manual_seed(seed)
    joint = a.shape[0] == b.shape[0]
    items, picks = _draws(a.shape[1], [a.shape[0]] if joint else [a.shape[0], b.shape[0]], g, replicates)
    sa, sb = (picks[0], picks[0]) if joint else picks
    return _replicate_means(a, items, sa) - _replicate_means(b, items, sb)


def bootstrap_p(reps: torch.Tensor) -> float:
    """Two-sided p-value of "no difference" from bootstrap replicates of a difference: twice the
    smaller share of replicates on either side of 0 (at least 1 / replicates)."""
    below, above = float((reps <= 0).double().mean()), float((reps >= 0).double().mean())
    return min(1.0, max(2 * min(below, above), 1 / len(reps)))


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values, by name: the family-wise error rate stays at the level."""
    order = sorted(p_values, key=p_values.get)
    adjusted, running = {}, 0.0
    for i, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * p_values[name]))
        adjusted[name] = running
    return adjusted
