"""task.source=files: a capability from JSONL, Parquet or CSV files, its correctness spans by rule,
regex or explicit offsets, every bad input reported with file, row and fix, the label report and
the dry-run command (jobs/check_task.py)."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs import check_task
from spd_ray.config import ConfigError, SPDConfig, load_config
from spd_ray.core.spans import calibration_batches
from spd_ray.tasks.files import TaskDataError
from spd_ray.tasks.item import Item
from spd_ray.tasks.labels import label_report
from spd_ray.tasks.task import load_task


def _prompt(n: int) -> str:  # "1 km = 1000 m" in the prompt: a regex must never label it
    return f"Convert {n} km to m (1 km = 1000 m).\nAnswer:"


def _answer(n: int) -> str:
    return f" {n} km = {n} * 1000 m = {n * 1000} m.\n#### {n * 1000}"


def _spans(n: int) -> list[list[int]]:  # "<n> km" and the final number, as offsets into the answer
    answer = _answer(n)
    return [[1, 1 + len(f"{n} km")], [len(answer) - len(str(n * 1000)), len(answer)]]


CAL = [{"id": f"u{n}", "prompt": _prompt(n), "answer": _answer(n), "answer_spans": _spans(n)} for n in (2, 3, 5)]
TRAIN = [{"id": f"p{n}", "prompt": _prompt(n), "answer": f" SECRET {n}"} for n in range(6, 10)]
TEST = [{"id": f"t{n}", "prompt": _prompt(n), "gold": n * 1000, "answer": _answer(n),
         "tests": [f"assert convert({n}) == {n * 1000}"], "setup": "import math"} for n in (11, 12)]
SPANS = {"regex": r"(\d+) k?m\b"}  # every number before a unit; the last match: the metres


def write(path: Path, rows: list[dict]) -> str:
    """`rows` in the format `path` names (.jsonl, .jsonl.gz, .parquet, or .csv with lists as JSON)."""
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
    elif path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` keeps what it reads in the test's own folder, not in the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


def config(tmp_path: Path, *overrides: str, ext: str = ".jsonl", cal=CAL, train=TRAIN, test=TEST, **files) -> SPDConfig:
    """A files task (capability `units`) written to `tmp_path` as `ext` files, from a YAML config;
    `files` replace keys of task.files."""
    parts = {"calibration": write(tmp_path / f"cal{ext}", cal), "train": write(tmp_path / f"train{ext}", train),
             "eval": {"test": write(tmp_path / f"test{ext}", test)}, "columns": {"id": "id"}, "spans": SPANS, **files}
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump({"task": {"source": "files", "domain": "units", "files": parts}}, sort_keys=False))
    return load_config(path, list(overrides))


def error(cfg: SPDConfig) -> str:
    with pytest.raises(TaskDataError) as err:
        load_task(cfg)
    return str(err.value)


def labeled(tokenizer, item: Item) -> list[str]:
    """The tokens stage 1 labels in `item`'s calibration text, decoded."""
    (batch,), _ = calibration_batches(tokenizer, [item.text], [item.correctness_spans()], batch_size=1, max_length=256)
    return [tokenizer.decode([int(t)]) for t, lab in zip(batch["input_ids"][0], batch["labels"][0]) if lab != -100]


# ---------------------------------------------------------------------------------------
# reading


@pytest.mark.parametrize("ext", [".parquet", ".csv", ".jsonl.gz"])
def test_every_format_gives_the_same_items(tmp_path, ext):
    def task(ext):  # explicit spans (a list column: JSON text in CSV); splits by gold, and by tests + setup
        test = write(tmp_path / f"test{ext}", TEST)
        return load_task(config(tmp_path, ext=ext, spans={}, eval={"test": test, "run": test},
                                split_scorers={"run": "asserts"}))

    want = task(".jsonl")
    assert task(ext) == want
    cal, test, run = want.calibration[1], want.eval_splits["units/test"][0], want.eval_splits["units/run"][0]
    assert (cal.id, cal.split, cal.prompt, cal.answer, cal.answer_spans, cal.metric) == (
        "u3", "calibration", _prompt(3), _answer(3), [(1, 5), (len(_answer(3)) - 4, len(_answer(3)))], "")
    assert (test.id, test.split, test.gold, test.tests, test.metric) == ("t11", "test", "11000", [], "exact")
    assert (run.tests, run.setup, run.gold, run.metric) == (["assert convert(11) == 11000"], "import math", "", "asserts")
    assert list(want.eval_splits) == ["units/test", "units/run"]


def test_file_urls_and_the_format_setting(tmp_path):
    cfg = config(tmp_path)
    shutil.copy(cfg.task.files.train, tmp_path / "train.data")  # no extension: task.files.format says
    url = config(tmp_path, "task.files.format=json", f"task.files.calibration=file://{tmp_path}/cal.jsonl",
                 f"task.files.train={tmp_path}/train.data")
    assert load_task(url) == load_task(cfg)


def test_training_rows_never_carry_answers(tmp_path):
    task = load_task(config(tmp_path))
    assert task.train_prompts == [r["prompt"] for r in TRAIN]
    assert all(it.answer == "" and it.gold == "" and it.split == "train" for it in task.train_items)
    assert "SECRET" not in repr(task)  # the training file's answer column was never read


def test_each_file_gives_its_first_n_rows(tmp_path):
    bad_third = [*CAL[:2], {**CAL[2], "answer": ""}]  # past the cap: never read, so no error
    task = load_task(config(tmp_path, "task.n_calibration=2", "task.n_train_prompts=3", "task.n_eval=1",
                            cal=bad_third))
    assert [it.id for it in task.calibration] == ["u2", "u3"]
    assert [it.id for it in task.train_items] == ["p6", "p7", "p8"]
    assert [it.id for it in task.eval_splits["units/test"]] == ["t11"]
    task = load_task(config(tmp_path, "task.n_eval=1", "task.n_eval_splits={units/test: 5}"))
    assert len(task.eval_splits["units/test"]) == 2  # fewer rows than n: all of them


def test_ids_are_row_numbers_without_an_id_column(tmp_path):
    task = load_task(config(tmp_path, columns={}))
    assert [it.id for it in task.calibration] == ["1", "2", "3"]
    assert [it.id for it in task.train_items] == ["1", "2", "3", "4"]


# ---------------------------------------------------------------------------------------
# span modes: exactly these tokens are labeled (never one of the prompt's)


@pytest.mark.parametrize("spans, tokens, rendered", [
    ({"rule": "final_number"}, ["2", "0", "0", "0"], "…m = 2 * 1000 m = 2000 m.\\n#### ⟦2000⟧"),
    (SPANS, ["2", "0", "0", "0"], "….\\nAnswer: 2 km = 2 * 1000 m = ⟦2000⟧ m.\\n#### 2000"),
    ({**SPANS, "match": "all"}, ["2", "1", "0", "0", "0", "2", "0", "0", "0"],
     "…to m (1 km = 1000 m).\\nAnswer: ⟦2⟧ km = 2 * ⟦1000⟧ m = ⟦2000⟧ m.\\n#### 2000"),
    ({}, ["2", " ", "k", "m", "2", "0", "0", "0"],
     "…to m (1 km = 1000 m).\\nAnswer: ⟦2 km⟧ = 2 * 1000 m = 2000 m.\\n#### ⟦2000⟧"),
], ids=["rule", "regex-last", "regex-all", "explicit"])
def test_span_modes_label_exactly_these_tokens(tmp_path, testbed_tokenizer, spans, tokens, rendered):
    cfg = config(tmp_path, spans=spans)
    task = load_task(cfg)
    assert labeled(testbed_tokenizer, task.calibration[0]) == tokens
    report = label_report(cfg, testbed_tokenizer, task.calibration)
    assert report.samples[0] == ("u2", rendered)


def test_the_label_report(tmp_path, testbed_tokenizer):
    cfg = load_config(None, ["task.source=files", "task.domain=units", "calibration.max_length=64",
                             "task.n_calibration=6"])  # the 6 items below: as many as asked

    def item(item_id, n, spans, prompt=None):
        return Item(id=item_id, domain="units", split="calibration", prompt=prompt or _prompt(n), answer=_answer(n),
                    answer_spans=spans)

    end = len(_answer(12))
    items = [item("km", 2, _spans(2)[:1]), item("both", 3, _spans(3)), item("two-digit", 12, _spans(12)),
             item("none", 2, []), item("inside", 2, [(6, 7)]),  # "=" inside the token " ="
             item("long", 12, [(end - 5, end)], prompt="Convert, please, " * 20 + _prompt(12))]
    report = label_report(cfg, testbed_tokenizer, items)
    assert report.labeled_tokens == [4, 8, 10]  # "2 km"; "3 km" + "3000"; "12 km" + "12000"
    lines = report.lines()
    assert lines[:5] == [
        "calibration labels (explicit spans, column 'answer_spans'): 3 of 6 examples labeled",
        "  labeled tokens per example: min 4, median 8, max 10",
        "  skipped 1, no correctness span: ids none",
        "  skipped 1, no token lies wholly inside a span: ids inside",
        "  skipped 1, its spans lie past calibration.max_length=64 tokens: ids long",
    ]
    assert [line.split(":")[0] for line in lines[5:]] == ["  km", "  both", "  two-digit"]
    assert "⟦12 km⟧" in lines[7] and "⟦12000⟧" in lines[7]
    # stage 1 skips the same examples: one labeling for both
    _, skipped = calibration_batches(testbed_tokenizer, [it.text for it in items],
                                     [it.correctness_spans() for it in items], batch_size=8, max_length=64)
    assert skipped == 3


# ---------------------------------------------------------------------------------------
# bad input: the file, the row and the fix, before any compute


def test_missing_or_unset_files(tmp_path):
    msg = error(config(tmp_path, f"task.files.train={tmp_path}/nope.jsonl"))
    assert f"{tmp_path}/nope.jsonl (task.files.train): no such file; fix the path" in msg
    msg = error(config(tmp_path, f"task.files.eval={{test: {tmp_path}/gone.csv}}"))
    assert "gone.csv (task.files.eval.test): no such file" in msg
    assert "task.files.calibration is not set: name the file of the labeled examples" in error(
        config(tmp_path, calibration=None))


def test_missing_column_lists_the_columns_and_the_key(tmp_path):
    cal = [{"id": r["id"], "prompt": r["prompt"], "completion": r["answer"]} for r in CAL]
    msg = error(config(tmp_path, cal=cal))
    assert "cal.jsonl (task.files.calibration) has no column 'answer' (the reference answer)" in msg
    assert "its columns: ['id', 'prompt', 'completion']" in msg
    assert "task.files.columns.answer=<column>" in msg
    # explicit spans need their column (or a rule or regex)
    msg = error(config(tmp_path, spans={}, cal=[{k: v for k, v in r.items() if k != "answer_spans"} for r in CAL]))
    assert "no column 'answer_spans'" in msg and "task.files.spans.rule or task.files.spans.regex" in msg
    # an id column named, but absent
    assert "train.jsonl (task.files.train) has no column 'key'" in error(config(tmp_path, columns={"id": "key"}, cal=[
        {**r, "key": r["id"]} for r in CAL]))


@pytest.mark.parametrize("scorer, column", [("asserts", "tests"), ("nll", "answer"), ("exact", "gold"),
                                            ("normalized", "gold"), ("my_scorers:check", "gold")])
def test_an_eval_split_needs_its_scorers_column(tmp_path, scorer, column):
    test = [{k: v for k, v in r.items() if k != column} for r in TEST]
    msg = error(config(tmp_path, test=test, scorer=scorer))
    assert f"test.jsonl (task.files.eval.test) has no column {column!r}" in msg
    assert f"task.files.columns.{column}=<column>, or choose another scorer than {scorer} for this split: " \
           "task.files.split_scorers.test" in msg


def test_a_regex_without_a_group_fails_before_any_file_is_read(tmp_path):
    cfg = config(tmp_path, f"task.files.calibration={tmp_path}/missing.jsonl", spans={"regex": r"\d+ m"})
    msg = error(cfg)
    assert r"task.files.spans.regex: the regex '\d+ m' has no capture group: put the part" in msg
    assert "does not compile" in error(config(tmp_path, spans={"regex": "(unclosed"}))


@pytest.mark.parametrize("span, problem", [
    ([-2, 3], "has span [-2, 3], which starts before the answer, overlapping the prompt: offsets count from "
              "the answer's first character (0)"),
    ([5, 99], f"has span [5, 99], which ends past the answer ({len(_answer(3))} characters): end at most "
              f"{len(_answer(3))}"),
    ([5, 5], "has span [5, 5], which is empty or reversed: need start < end"),
    ([7, 5], "has span [7, 5], which is empty or reversed"),
])
def test_explicit_spans_must_lie_in_the_answer(tmp_path, span, problem):
    cal = [CAL[0], {**CAL[1], "answer_spans": [[1, 3], span]}, CAL[2]]
    msg = error(config(tmp_path, spans={}, cal=cal))
    assert msg.startswith(f"{tmp_path}/cal.jsonl (task.files.calibration), line 2 (id 'u3'): column "
                          "'answer_spans' (the correctness spans, [[start, end], ...] into the answer) " + problem)


@pytest.mark.parametrize("cell, problem", [
    ([], "holds []: write a non-empty list, [[start, end], ...]"),
    ([1, 4], "holds [1, 4]: write [[start, end], ...]"),
    ("[[1, 4]", "not JSON: write [[start, end], ...]"),
])
def test_explicit_spans_must_be_pairs(tmp_path, cell, problem):
    cal = [{**CAL[0], "answer_spans": cell}, *CAL[1:]]
    msg = error(config(tmp_path, spans={}, cal=cal))
    assert "line 1 (id 'u2')" in msg and problem in msg


@pytest.mark.parametrize("prompt", ["", None, "   "])
def test_an_empty_prompt(tmp_path, prompt):
    train = [TRAIN[0], {**TRAIN[1], "prompt": prompt}]
    msg = error(config(tmp_path, train=train))
    assert ("train.jsonl (task.files.train), line 2 (id 'p7'): column 'prompt' (the prompt) is empty: a training "
            "prompt cannot be empty; fill it in or drop the row") in msg


def test_a_calibration_row_without_an_answer(tmp_path):
    msg = error(config(tmp_path, cal=[CAL[0], CAL[1], {**CAL[2], "answer": None}]))
    assert "cal.jsonl (task.files.calibration), line 3 (id 'u5'): column 'answer' (the reference answer) is empty" in msg


def test_an_eval_row_without_its_gold_or_tests(tmp_path):
    msg = error(config(tmp_path, test=[TEST[0], {**TEST[1], "gold": ""}]))
    assert "test.jsonl (task.files.eval.test), line 2 (id 't12'): column 'gold' (the expected answer) is empty: " \
           "the exact scorer of split test needs it" in msg
    msg = error(config(tmp_path, "task.files.scorer=asserts", ext=".csv", test=[{**TEST[0], "tests": "assert x"}]))
    assert "test.csv (task.files.eval.test), line 2 (id 't11'): column 'tests' (the assert lines) holds " \
           "'assert x', not JSON: write [\"assert f(1) == 2\", ...] (in CSV as JSON text)" in msg
    msg = error(config(tmp_path, "task.files.scorer=asserts", test=[{**TEST[0], "tests": []}]))
    assert "line 1 (id 't11'): column 'tests' (the assert lines) holds []: write a non-empty list" in msg


def test_an_empty_file_and_an_unreadable_one(tmp_path):
    cfg = config(tmp_path)
    Path(cfg.task.files.train).write_text("")
    assert f"{tmp_path}/train.jsonl (task.files.train) is empty" in error(cfg)
    Path(cfg.task.files.train).write_text('{"id": "p1", "prompt": "x"}\nnot json\n')
    assert ("train.jsonl (task.files.train): line 2 is not valid JSON (Expecting value, column 1); "
            "fix or remove that line") in error(cfg)
    Path(cfg.task.files.train).write_text("\n\n")  # no row: datasets refuses it
    assert "cannot read it as json (ValueError: " in error(cfg)
    (tmp_path / "header.csv").write_text("id,prompt\n")
    msg = error(config(tmp_path, f"task.files.train={tmp_path}/header.csv"))
    assert "header.csv (task.files.train): cannot read it as csv (" in msg and "at least one" in msg
    msg = error(config(tmp_path, f"task.files.train={tmp_path}/train.txt"))
    assert "train.txt (task.files.train): cannot tell the format from the file's name" in msg
    assert "or set task.files.format to json, parquet or csv" in msg


def test_duplicated_ids_name_both_rows(tmp_path):
    msg = error(config(tmp_path, cal=[CAL[0], CAL[1], {**CAL[2], "id": "u2"}]))
    assert "cal.jsonl (task.files.calibration): line 1 and line 3 both have id 'u2': ids must be unique" in msg
    assert "column 'id' (each row's id) is empty" in error(config(tmp_path, cal=[{**CAL[0], "id": None}]))


def test_no_calibration_row_with_a_span_is_an_error_one_is_a_skip(tmp_path, testbed_tokenizer):
    msg = error(config(tmp_path, spans={"regex": r"(\d+) miles"}))
    assert r"cal.jsonl (task.files.calibration): no row has a correctness span under task.files.spans.regex='(\d+) " \
           "miles'" in msg and "fix the regex or the answers" in msg
    assert "task.files.spans.rule=asserts" in error(config(tmp_path, spans={"rule": "asserts"}))
    # one such row is kept, and counted as skipped by the report
    cfg = config(tmp_path, spans={"rule": "final_number"}, cal=[*CAL[:2], {**CAL[2], "answer": " 5000 m"}])
    task = load_task(cfg)
    assert task.calibration[2].correctness_spans() == []
    assert label_report(cfg, testbed_tokenizer, task.calibration).skipped == {"no correctness span": ["u5"]}


# ---------------------------------------------------------------------------------------
# the dry run


def test_check_task_prints_the_summary_and_the_label_report(tmp_path, capsys):
    config(tmp_path)
    assert check_task.main(["--config", str(tmp_path / "task.yaml"), "task.n_train_prompts=2",
                            "task.n_calibration=3", "task.n_eval=2"]) == 0  # no file short of rows
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == ["task units (task.source=files)",
                       f"  calibration       3 rows  from {tmp_path}/cal.jsonl",
                       f"  train             2 rows  from {tmp_path}/train.jsonl",
                       f"  units/test        2 rows  scorer exact  from {tmp_path}/test.jsonl"]
    assert out[4] == r"calibration labels (regex '(\d+) k?m\b', last match): 3 of 3 examples labeled"
    assert out[5] == "  labeled tokens per example: min 4, median 4, max 4"
    assert out[6].startswith("  u2: …") and "⟦2000⟧" in out[6] and len(out) == 9


def test_check_task_exits_2_on_bad_input(tmp_path, capsys):
    config(tmp_path, train=[{"id": "p1", "prompt": ""}])
    assert check_task.main(["--config", str(tmp_path / "task.yaml")]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after any progress bar of `datasets`
    assert last.startswith(f"error: {tmp_path}/train.jsonl (task.files.train), line 1 (id 'p1')")
    # every example's spans cut off by calibration.max_length: the report says so, then the error
    assert check_task.main(["--config", str(tmp_path / "task.yaml"), "calibration.max_length=8",
                            f"task.files.train={tmp_path}/cal.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "error: no calibration example of task units has a labeled token, so stage 1 would have " \
           "nothing to learn from:\ncalibration labels" in err
    assert "skipped 3, its spans lie past calibration.max_length=8 tokens: ids u2, u3, u5" in err
    assert check_task.main(["--config", str(tmp_path / "missing.yaml")]) == 2


def test_the_pre_run_check_knows_a_files_task_runs_model_code(tmp_path, monkeypatch):
    from spd_ray import checks
    from spd_ray.tasks.sandbox import SandboxUnavailable

    def unavailable():
        raise SandboxUnavailable("bubblewrap (bwrap) is not installed")

    monkeypatch.setattr(checks, "require_isolation", unavailable)
    checks.check(config(tmp_path))  # an exact-match task runs no code
    with pytest.raises(ConfigError, match="bubblewrap"):  # an asserts split would run the model's programs
        checks.check(config(tmp_path, "task.files.scorer=asserts"))
    with pytest.raises(ConfigError, match="evaluation.domains=.*does not apply to task.source=files"):
        checks.check(config(tmp_path, "evaluation.domains=[math]"))


def test_a_file_edited_in_place_changes_the_fingerprint_of_its_part_only(tmp_path):
    # the run directory keys each artifact by these: an edited file is never answered from the old one
    cfg = config(tmp_path)
    before = load_task(cfg).fingerprints()
    write(tmp_path / "cal.jsonl", [{**CAL[0], "answer": CAL[0]["answer"] + " (checked)"}, *CAL[1:]])
    after = load_task(cfg).fingerprints()
    assert after["calibration"] != before["calibration"]
    assert (after["train"], after["eval"]) == (before["train"], before["eval"])
