import dataclasses

import pytest

from spd_ray.config import EvalConfig
from spd_ray.tasks.evaluation import evaluate_model, reference_nll, score
from spd_ray.tasks.testbed import make_split


def test_reference_answers_score_perfectly_and_wrong_ones_do_not():
    items = [it for d in ("math", "mcq", "code") for it in make_split(d, "test", 4)]
    assert all(score(items, [it.answer for it in items]))
    wrong = {"math": " 1 + 1 = 2.\n#### -999", "mcq": " Z", "code": "\ndef nothing():\n    pass\n"}
    assert not any(score(items, [wrong[it.domain] for it in items]))
    # the code domain: a wrong program that exits "successfully" before its asserts fails
    code = [it for it in items if it.domain == "code"]
    for ending in ("raise SystemExit", "import os\nos._exit(0)", "import atexit, os\natexit.register(os._exit, 0)"):
        assert not any(score(code, [f"{wrong['code']}{ending}\n"] * len(code)))


def test_evaluate_model_reports_every_split(testbed_model, testbed_tokenizer):
    splits = {f"{d}/test": make_split(d, "test", 6) for d in ("math", "code")}
    metrics = evaluate_model(testbed_model, testbed_tokenizer, splits, EvalConfig(max_new_tokens=48))
    assert set(metrics) == {"math/test/accuracy", "code/test/accuracy", "code/test/nll"}
    assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if k.endswith("accuracy"))
    # the model has learned the code format: references are likelier than scrambled references
    items = splits["code/test"]
    scrambled = [dataclasses.replace(it, answer=" ".join(reversed(it.answer.split(" ")))) for it in items]
    assert 0 < metrics["code/test/nll"] < reference_nll(testbed_model, testbed_tokenizer, scrambled)
    # batching does not change the value
    assert reference_nll(testbed_model, testbed_tokenizer, items, batch_size=1) == pytest.approx(
        metrics["code/test/nll"], rel=1e-4)
