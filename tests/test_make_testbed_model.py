"""The v2 build's data order and stopping rule (jobs/make_testbed_model.py), without training."""

import importlib.util
import random
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "make_testbed_model", Path(__file__).resolve().parents[1] / "jobs" / "make_testbed_model.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)


def _mixture(seed: int) -> "build.Mixture":
    pools = {"a": [f"a{i}" * (i % 7 + 1) for i in range(100)], "b": [f"b{i}" for i in range(50)]}
    return build.Mixture(pools, {"a": 1.0, "b": 1.0}, random.Random(seed))


def test_the_mixture_is_deterministic_in_its_seed_and_groups_lengths():
    a, b = _mixture(0), _mixture(0)
    batches = [a.batch(8) for _ in range(20)]
    assert batches == [b.batch(8) for _ in range(20)]
    assert batches != [_mixture(1).batch(8) for _ in range(20)]
    spread = [max(map(len, x)) - min(map(len, x)) for x in batches]
    assert sum(spread) / len(spread) < 8  # rows of similar length share a batch


def test_the_band_stops_training_and_a_domain_above_it_is_fed_less_one_below_more():
    acc = {"math/test": 0.5, "math/transfer": 0.4, "mcq/test": 0.36, "mcq/transfer": 0.64,
           "code/test": 0.5, "code/transfer": 0.5}
    assert build.in_band(acc, 0.35, 0.65)
    assert not build.in_band({**acc, "code/transfer": 0.2}, 0.35, 0.65)
    mix = _mixture(0)
    mix.weights.update({"math": 1.0, "mcq": 1.0, "code": 1.0})
    build.reweight(mix, {**acc, "math/test": 0.8, "code/test": 0.2, "code/transfer": 0.3}, 0.35, 0.65)
    assert (mix.weights["math"], mix.weights["mcq"], mix.weights["code"]) == (0.25, 1.0, 2.0)
    build.reweight(mix, {**acc, "code/test": 0.2}, 0.35, 0.65)
    assert mix.weights["code"] == 2.0  # one split below, none above: fed more (v2.3)
    build.reweight(mix, {**acc, "code/test": 0.2, "code/transfer": 0.7}, 0.35, 0.65)
    assert mix.weights["code"] == 0.25  # one above wins over one below
    build.reweight(mix, acc, 0.35, 0.65)
    assert (mix.weights["math"], mix.weights["code"]) == (1.0, 1.0)  # back in the band: fed in full


def test_the_kept_evaluation_is_the_one_closest_to_the_band():
    assert build.outside({"a": 0.5, "b": 0.6}, 0.35, 0.65) == 0
    assert build.outside({"a": 0.25, "b": 0.8}, 0.35, 0.65) == pytest.approx(0.10 + 0.15)


def test_multiple_choice_rows_come_in_blocks_of_one_to_three():
    texts = [f"Question {i}\nAnswer: A" for i in range(300)]
    blocks = build.few_shot_blocks(texts, random.Random(0))
    assert "\n\n".join(blocks) == "\n\n".join(texts)  # every text once, in order
    assert {b.count("Question") for b in blocks} == {1, 2, 3}
