import random

import pytest
import torch

from spd_ray.stats import as_matrix, mean_interval, paired_difference


def _arm(p: float, seeds: int, items: int, rng: random.Random) -> torch.Tensor:
    return as_matrix(["".join("1" if rng.random() < p else "0" for _ in range(items)) for _ in range(seeds)])


def test_interval_holds_the_mean_and_narrows_with_items():
    rng = random.Random(0)
    small, large = _arm(0.5, 5, 100, rng), _arm(0.5, 5, 1600, rng)
    a, b = mean_interval(small), mean_interval(large)
    assert a.low < a.mean < a.high and b.low < b.mean < b.high
    assert (b.high - b.low) < 0.5 * (a.high - a.low)  # 16x the items: about a quarter the width
    assert a.low < 0.5 < a.high


def test_paired_difference_of_an_arm_with_itself_is_exactly_zero():
    m = _arm(0.4, 5, 200, random.Random(1))
    d = paired_difference(m, m)
    assert (d.mean, d.low, d.high) == (0.0, 0.0, 0.0) and d.verdict() == "inconclusive"


def test_pairing_by_item_detects_a_shift_that_unpaired_noise_would_hide():
    """b is a with 8% of the items flipped from wrong to right: the paired interval excludes 0."""
    rng = random.Random(2)
    a = _arm(0.5, 1, 400, rng)
    flip = [i for i in range(400) if a[0, i] == 0][:32]
    b = a.clone()
    b[0, flip] = 1
    d = paired_difference(b, a)
    assert d.mean == pytest.approx(0.08) and d.verdict() == "confirmed" and d.low > 0.04
    assert paired_difference(a, b).verdict() == "refuted"
    assert d.mde == pytest.approx(2.8 * d.se)


def test_a_greedy_arm_of_one_row_pairs_with_an_arm_of_seeds():
    rng = random.Random(3)
    base, spd = _arm(0.5, 1, 300, rng), _arm(0.5, 5, 300, rng)
    d = paired_difference(spd, base)
    assert d.mean == pytest.approx(float(spd.mean() - base.mean()))
    assert d.low < d.mean < d.high


def test_unequal_rows_or_items_are_refused():
    with pytest.raises(ValueError, match="equal length"):
        as_matrix(["0101", "011"])
    with pytest.raises(ValueError, match="same items"):
        paired_difference(as_matrix(["01"]), as_matrix(["011"]))


def test_holm_adjusts_step_down_and_keeps_the_order():
    from spd_ray.stats import holm

    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    assert adjusted == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.5})


def test_bootstrap_p_is_small_for_a_clear_difference_and_large_for_none():
    from spd_ray.stats import bootstrap_p, paired_replicates

    a = torch.tensor([[1.0] * 60 + [0.0] * 40])
    assert bootstrap_p(paired_replicates(a, torch.tensor([[0.0] * 100]))) < 0.01
    b = torch.tensor([[0.0] * 40 + [1.0] * 60])  # the same mean, other items: no difference
    assert bootstrap_p(paired_replicates(a, b)) > 0.5
