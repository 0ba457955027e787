import dataclasses
import sys
import textwrap

import pytest

from spd_ray.config import SCORERS, ConfigError, EvalConfig, GenerationConfig
from spd_ray.stages.evaluate import evaluate_on_ray
from spd_ray.tasks.evaluation import (
    accuracy_scorers,
    accuracy_splits,
    check_scorers,
    evaluate_model,
    nll_splits,
    reference_nll,
    register_scorer,
    resolve_scorer,
    score,
    split_metrics,
    text_scorer,
)
from spd_ray.tasks.item import Item
from spd_ray.tasks.testbed import make_split


def item(metric: str, gold: str = "", **fields) -> Item:
    """An item of a split "units/test" scored by `metric`."""
    return Item(**{"id": f"{metric}-1", "domain": "units", "split": "test", "prompt": "Q:",
                   "answer": " ref", "gold": gold, "metric": metric, **fields})


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


def test_reference_nll_in_chunks_of_rows_equals_the_whole_batch(testbed_model, testbed_tokenizer):
    items = make_split("code", "test", 6)
    calls = []
    hook = testbed_model.register_forward_hook(lambda module, args, out: calls.append(out.logits.shape[0]))
    try:
        whole = reference_nll(testbed_model, testbed_tokenizer, items, batch_size=6)
        assert calls == [6]
        calls.clear()
        chunked = reference_nll(testbed_model, testbed_tokenizer, items, batch_size=6, max_logits=1)
    finally:
        hook.remove()
    assert calls == [1] * 6  # a logits budget below one row's: one row per forward
    assert chunked == pytest.approx(whole, rel=1e-5, abs=1e-5)


def test_gpu_tasks_run_on_single_use_workers():
    """Ray recycles a task's worker unless max_calls=1 is in the decorator (.options cannot set
    it): a recycled worker would keep its CUDA memory, and vLLM then refuses that GPU."""
    from spd_ray.stages.evaluate import _reference_nll
    from spd_ray.stages.generate import save_folded_checkpoint

    for task in (_reference_nll, save_folded_checkpoint):
        assert task._default_options["max_calls"] == 1


RIGHT_AND_WRONG = [
    (item("exact", "Paris"), " Paris.\nQ: next", " paris"),
    (item("normalized", "(B)"), " B. because", " (C)"),
    (item("number", "12"), " 5 + 7 = 12\n#### 12", " #### 13"),
    (item("choice", "C"), " C. Paris", " A"),
    (item("regex", "yes", pattern=r"Final: *(\w+)"), " Final: Yes\nFinal: no", " Final: no\nFinal: yes"),
    (item("asserts", tests=["assert f(1) == 2"]), "def f(x):\n    return x + 1\n", "def f(x):\n    return x\n"),
]


def test_every_scorer_but_nll_gives_accuracy_and_each_domain_has_its_own():
    assert accuracy_scorers() == [it.metric for it, _, _ in RIGHT_AND_WRONG]  # each tested below
    assert list(SCORERS) == [*accuracy_scorers(), "nll"]
    assert {d: Item("1", d, "test", "Q:", "").metric for d in ("math", "mcq", "code", "units")} == {
        "math": "number", "mcq": "choice", "code": "asserts", "units": ""}
    needs = {name: s.needs for name, s in SCORERS.items() if s.needs != "gold"}
    assert needs == {"asserts": "tests", "nll": "answer"}


def test_a_scorer_is_registered_once_and_only_under_a_declared_name():
    with pytest.raises(ValueError, match=r"scorer 'exact' is registered twice"):
        text_scorer("exact")(lambda completion, it: True)
    for name in ("fuzzy", "nll"):
        with pytest.raises(ValueError, match=rf"scorer '{name}' is not an accuracy scorer of "
                                             r"config.SCORERS \(\['exact', .*'asserts'\]\): "
                                             "declare it there first"):
            register_scorer(name)(lambda items, completions, ev: [])
    assert score([item("exact", "x")], [" x"]) == [True]  # the registered function is unchanged


@pytest.mark.parametrize("scorer, right, wrong", RIGHT_AND_WRONG)
def test_each_scorer_tells_right_from_wrong(scorer, right, wrong):
    check_scorers({"units/test": [scorer]})
    assert score([scorer, scorer], [right, wrong]) == [True, False]


def test_nll_splits_report_the_reference_nll_only():
    splits = {"units/test": [item("nll")], "units/transfer": [item("exact", "x")]}
    assert nll_splits(splits) == ["units/test"] and accuracy_splits(splits) == ["units/transfer"]
    assert split_metrics(splits, {"units/transfer": [" x"]}, {"units/test": 0.5}, EvalConfig()) == {
        "units/test/nll": 0.5, "units/transfer/accuracy": 1.0}
    with pytest.raises(ValueError, match=r"item nll-1 has no accuracy scorer \(metric 'nll'\); "
                                         r"valid metrics: \['exact', 'normalized', 'number', "
                                         r"'choice', 'regex', 'asserts'\] or"):
        score(splits["units/test"], ["x"])


USER_SCORERS = """
def same_length(completion, gold):
    return len(completion.strip()) == len(gold)

def broken(completion, gold):
    raise KeyError("oops")

def says_no(completion, gold):
    return "no"

def one_argument(completion):
    return True

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """The module `my_scorers` (and `needs_missing`, whose import fails) on sys.path."""
    (tmp_path / "my_scorers.py").write_text(textwrap.dedent(USER_SCORERS))
    (tmp_path / "needs_missing.py").write_text("import spd_ray_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_scorers"
    for name in ("my_scorers", "needs_missing"):
        sys.modules.pop(name, None)
    resolve_scorer.cache_clear()


def test_user_scorer(user_module, tmp_path, monkeypatch):
    scorer = item("my_scorers:same_length", "four")
    check_scorers({"units/test": [scorer]})
    assert score([scorer, scorer], [" 1234 ", "12345"]) == [True, False]
    # imported once: it keeps working with its module off the path and out of sys.modules
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    sys.modules.pop(user_module)
    assert score([scorer], ["abcd"]) == [True]


@pytest.mark.parametrize("name, message", [
    ("spd_ray_no_such_module:f", r"cannot import spd_ray_no_such_module .*put spd_ray_no_such_module.py "
                                 r"on PYTHONPATH or in the job's working_dir"),
    ("needs_missing:f", r"cannot import needs_missing .*spd_ray_no_such_dependency.*install what it imports"),
    ("my_scorers:absent", r"my_scorers.py has no 'absent'; define `def absent\(completion: str, gold: str\)"),
    ("my_scorers:NOT_A_FUNCTION", r"my_scorers.NOT_A_FUNCTION is a int, not a function"),
    ("my_scorers:one_argument", r"one_argument\(completion\) cannot be called as fn\(completion, gold\)"),
])
def test_user_scorer_errors_name_the_problem_and_the_fix(user_module, name, message):
    with pytest.raises(ConfigError, match=message):
        resolve_scorer(name)
    with pytest.raises(ConfigError, match=f"split units/test: scorer '{name}'"):
        check_scorers({"units/test": [item(name)]})


def test_user_scorer_failures_name_the_function_and_the_item(user_module):
    with pytest.raises(RuntimeError, match="scorer my_scorers:broken raised KeyError on item my_scorers:broken-1"):
        score([item("my_scorers:broken")], ["x"])
    with pytest.raises(TypeError, match="returned 'no' on item .*must return True or False"):
        score([item("my_scorers:says_no")], ["x"])


@pytest.mark.parametrize("items, message", [
    ([item("exactly")], r"split units/test \(scorer 'exactly'\): no such scorer; valid ones: \['exact'"),
    ([item("regex", pattern=r"Final: \w+")], r"has no capture group: put the part"),
    ([item("regex", pattern=r"Final: (\w+")], r"does not compile"),
    ([item("regex")], r"no pattern to match; set one \(task.files.scorer_regex\)"),
    ([item("exact"), item("number")], r"split units/test mixes the scorers \['exact', 'number'\]"),
    ([item("asserts")], r"item asserts-1 has no tests"),
    ([item("nll", answer="")], r"no item has a reference answer"),
])
def test_check_scorers_refuses_bad_splits(items, message):
    with pytest.raises(ConfigError, match=message):
        check_scorers({"units/test": items})


def test_bad_scorers_fail_before_any_generation():
    bad = {"units/test": [item("regex", pattern="no group")]}
    # no model, tokenizer or Ray: the check is all that runs
    with pytest.raises(ConfigError, match="no capture group"):
        evaluate_model(None, None, bad, EvalConfig())
    with pytest.raises(ConfigError, match="no capture group"):
        evaluate_on_ray(None, EvalConfig(), bad, None, GenerationConfig())
