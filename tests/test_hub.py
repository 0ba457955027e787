"""The hub source on local files in the real hub schemas (tests/hub_files.py), its scorers, and
BBH's normalized match."""

import re

import pytest

from spd_ray.config import ConfigError, EvalConfig, load_config
from spd_ray.core.spans import correctness_spans
from spd_ray.tasks import hub
from spd_ray.tasks.evaluation import check_scorers, score, split_metrics
from spd_ray.tasks.scoring import score_normalized
from spd_ray.tasks.task import load_task
from spd_ray.tasks.testbed import make_split
from tests import hub_files

# the testbed's prompt layouts, which spans and scorers rely on
LAYOUTS = {
    "math": re.compile(r"Question: [^\n].*\nAnswer:", re.DOTALL),
    "mcq": re.compile(r"Question: .+\nA\. .+\nB\. .+\nC\. .+\nD\. .+\nAnswer:", re.DOTALL),
    "code": re.compile(r"Instruction: .+\.\nYour code should pass these tests:\n(assert .+\n)+Code:\n"),
}
WRONG = {"math": " 2 + 2 = 4.\n#### -999", "mcq": " Z", "code": "def nothing():\n    pass\n"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(hub_files.write_hub_files(tmp_path_factory.mktemp("hub")))


def hub_task(data_dir, domain, *overrides):
    return load_task(load_config(None, [f"task.domain={domain}", "task.source=hub", f"task.data_dir={data_dir}",
                                        "task.n_calibration=2", "task.n_train_prompts=4", *overrides]))


@pytest.mark.parametrize("domain", ["math", "mcq", "code"])
def test_calibration_and_training_prompts(data_dir, domain):
    task = hub_task(data_dir, domain)
    assert LAYOUTS[domain].fullmatch(make_split(domain, "calibration", 1)[0].prompt)  # the testbed's layout
    assert len(task.calibration) == 2 and len(task.train_items) == 4
    assert not {it.prompt for it in task.calibration} & set(task.train_prompts)
    for it in task.calibration + task.train_items:
        assert LAYOUTS[domain].fullmatch(it.prompt), it.prompt
        spans = correctness_spans(it.text, it.span_rule)
        if domain == "code":
            assert [it.text[s:e] for s, e in spans] == it.tests and "\r" not in it.answer
        else:
            # the authors' spans run to the end of the text: " A" (space included), "1,350"
            assert it.gold and it.text[spans[0][0]:spans[0][1]].replace(",", "").strip() == it.gold
    # the shuffle follows task.seed
    other = hub_task(data_dir, domain, "task.seed=1")
    assert [it.id for it in other.calibration + other.train_items] != [it.id for it in task.calibration + task.train_items]


def test_eval_splits_and_golds(data_dir):
    splits = hub_task(data_dir, "math", "evaluation.domains=[math,mcq,code]", "task.n_eval=12",
                      "task.n_eval_splits={math/test: 2}").eval_splits
    assert list(splits) == [f"{d}/{s}" for d in ("math", "mcq", "code") for s in ("test", "transfer")]
    assert [it.gold for it in splits["math/test"]] == ["18", "3"]  # the first n of GSM8K test
    assert [it.gold for it in splits["math/transfer"]] == ["145", "51", "1"]  # SVAMP: float answers
    assert splits["math/transfer"][0].prompt == (
        "Question: There are 87 oranges and 290 bananas in Philip's collection. If the bananas are organized "
        "into 2 groups and oranges are organized into 93 groups How big is each group of bananas?\nAnswer:")
    assert [it.gold for it in splits["mcq/test"]] == ["B", "C", "D"]
    assert splits["mcq/test"][0].prompt.endswith("over Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    bbh = splits["mcq/transfer"]  # 12 // 6 = 2 of each of the six subtasks, scored by normalized match
    assert [it.id.split("/")[1] for it in bbh] == [t for t in hub.BBH_TASKS for _ in range(2)]
    assert {it.metric for it in bbh} == {"normalized"} and bbh[0].prompt.startswith("Q: The following paragraphs")
    assert bbh[0].prompt.endswith("(C) Eve finished last\nA:") and [it.gold for it in bbh[6:8]] == ["False", "True"]
    mbpp = splits["code/test"]
    assert all(LAYOUTS["code"].fullmatch(it.prompt) for it in mbpp)
    assert [it.setup for it in mbpp] == ["", "import math", ""] and len(mbpp[1].tests) == 3
    alpaca = splits["code/transfer"]  # the last n of CodeAlpaca-20k, NLL only
    assert [it.id for it in alpaca] == [f"codealpaca/train/{i}" for i in range(4)]
    assert {it.metric for it in alpaca} == {"nll"} and not any(it.tests for it in alpaca)
    assert alpaca[2].prompt == ("### Instruction:\nWrite a replace method for a string class which replaces the given "
                                "string with a given set of characters.\n### Input:\nstring = \"Hello World!\"\n"
                                "replace_with = \"Greetings!\"\n### Response:\n")
    last = hub_task(data_dir, "code", "task.n_eval=2").eval_splits["code/transfer"]
    assert [it.id for it in last] == ["codealpaca/train/2", "codealpaca/train/3"]


def test_scorers_on_hub_items(data_dir):
    splits = hub_task(data_dir, "math", "evaluation.domains=[math,mcq,code]", "task.n_eval=12").eval_splits
    check_scorers(splits)  # every hub split passes the check made before any compute
    scored = [it for name, items in splits.items() if name != "code/transfer" for it in items]
    assert all(score(scored, [it.answer for it in scored]))
    assert not any(score(scored, [WRONG[it.domain] for it in scored]))
    # MBPP sanitized: the test imports run before the completion, which may then omit them
    sphere = splits["code/test"][1]
    body = "def volume_sphere(r):\n  return (4/3)*math.pi*r**3\n"
    assert score([sphere], [body]) == [True]
    assert score([sphere], [body.replace("**3", "**2")]) == [False]
    # a wrong body that ends its process "successfully" before the asserts is no pass
    for ending in ("exit()", "import sys\nsys.exit(0)", "import os\nos._exit(0)",
                   "import atexit, os\natexit.register(os._exit, 0)"):
        assert score([sphere], [f"{body.replace('**3', '**2')}\n{ending}\n"]) == [False]
    # BBH answers as a model writes them
    bbh = splits["mcq/transfer"]
    assert score(bbh[:4], [" (B) Eli finished last", "(C)", " Let's see. So the answer is (D).", " (D)"]) == [
        True, False, True, False]
    # an NLL-only split (CodeAlpaca) reports no accuracy
    metrics = split_metrics({"code/transfer": splits["code/transfer"], "math/test": splits["math/test"]},
                            {"math/test": ["#### 18", "#### 4", "#### 70000"]}, {"code/transfer": 0.7}, EvalConfig())
    assert metrics == {"code/transfer/nll": 0.7, "math/test/accuracy": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="no accuracy scorer"):
        score(splits["code/transfer"][:1], ["x"])


@pytest.mark.parametrize("completion, target, correct", [
    (" True", "True", True),
    (" true.\nQ: not False is", "True", True),
    (" False", "True", False),
    (" No, because his hand slipped.", "No", True),
    (" yes", "yes", True),
    (" Yes", "no", False),
    (" Let's think step by step. The answer is: valid.", "valid", True),
    (" invalid", "valid", False),
    (" (B)", "(B)", True),
    (" B.", "(B)", True),
    (" (D) 12/14/1937", "(D)", True),
    (" So the answer is (A).", "(A)", True),
    (" A car would never do that.", "(A)", False),  # an article, not the option
    (" (C)", "(B)", False),
    ("", "True", False),
])
def test_score_normalized(completion, target, correct):
    assert score_normalized(completion, target) is correct


def test_missing_files_and_fields_name_the_dataset_and_the_fix(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        hub_task(tmp_path, "math")
    for words in ("gsm8k", "openai/gsm8k", str(tmp_path / "openai/gsm8k/main/train"), "task.data_dir"):
        assert words in str(err.value)
    with pytest.raises(ValueError, match="7 rows.*at most 5"):
        hub_task(data_dir, "math", "task.n_train_prompts=6")
    (tmp_path / "openai/gsm8k/main").mkdir(parents=True)
    (tmp_path / "openai/gsm8k/main/train.jsonl").write_text('{"question": "q", "solution": "#### 1"}\n')
    with pytest.raises(ValueError, match=r"lacks the field\(s\) \['answer'\]"):
        hub_task(tmp_path, "math")


def test_hub_loading_failure_names_the_dataset_and_the_fix():
    # tests run offline (conftest): loading by name fails at once
    with pytest.raises(RuntimeError, match="cannot load gsm8k \\(openai/gsm8k, config main.*task.data_dir"):
        load_task(load_config(None, ["task.source=hub"]))


def test_task_config_checks_hub_names_and_split_sizes():
    cfg = load_config(None, ["task.hub_datasets={gsm8k: my/gsm8k:main}", "task.n_eval_splits={code/test: 257}"])
    assert cfg.task.hub_datasets["gsm8k"] == "my/gsm8k:main"
    assert cfg.task.hub_datasets["svamp"] == "ChilleD/SVAMP"  # the other defaults stay
    with pytest.raises(ConfigError, match="task.hub_datasets.gsm9k.*gsm8k"):
        load_config(None, ["task.hub_datasets={gsm9k: x}"])
    with pytest.raises(ConfigError, match="code/dev.*<domain>/<split>"):
        load_config(None, ["task.n_eval_splits={code/dev: 3}"])
    with pytest.raises(ConfigError, match="n_eval_splits.code/test.*int"):
        load_config(None, ["task.n_eval_splits={code/test: many}"])
    # the testbed honours per-split sizes too
    task = load_task(load_config(None, ["task.n_train_prompts=1", "task.n_eval=3", "task.n_eval_splits={math/test: 2}"]))
    assert [len(task.eval_splits[k]) for k in ("math/test", "math/transfer")] == [2, 3]
