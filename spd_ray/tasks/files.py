"""Any capability from data files (task.source=files, configured by `task.files`): labeled
calibration examples, training prompts and evaluation splits, each a JSONL, Parquet or CSV file,
local or at an fsspec URL (file://, s3://, gs://, hf://), read with `datasets`.

- calibration: prompt + answer per row, and the correctness spans of the answer by a rule, a
  regex (group 1 of its last match or of every match, in the answer only) or explicitly
  ([[start, end], ...] character offsets into the answer, the answer_spans column);
- train: the prompt column; where the file also has what the evaluation scorer reads (gold, or
  tests), it is read for one diagnostic, the raw corpus's accuracy (the Table 3 check), never for
  generation or training;
- evaluation, one file per split, named "<domain>/<split>": prompt plus what its scorer needs
  (gold, or tests for asserts, or the answer for nll).
Each file gives its first n rows (task.n_calibration, n_train_prompts, n_eval, n_eval_splits);
a file that holds fewer gives all of them, with a warning. Every problem is found here, before
any compute, and reported (`TaskDataError`) with the file, where in it (JSON Lines and CSV: the
line of the file, 1-based, as an editor shows it; Parquet: the row, 1 is the first) and the fix.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import datasets
import fsspec

from spd_ray import console
from spd_ray.config import SCORERS, ColumnsConfig, TaskConfig
from spd_ray.core.spans import regex_spans, span_regex
from spd_ray.tasks.item import Item


class TaskDataError(ValueError):
    """A problem in a task's data files; the message names the file, the row and the fix."""


# file name endings -> `datasets` reader (json and csv decompress .gz themselves)
FORMATS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json",
           ".parquet": "parquet", ".csv": "csv", ".csv.gz": "csv"}
# what each column holds (for messages)
HOLDS = {"id": "each row's id", "prompt": "the prompt", "answer": "the reference answer",
         "gold": "the expected answer", "tests": "the assert lines", "setup": "code run before the program",
         "answer_spans": "the correctness spans, [[start, end], ...] into the answer"}


def load_files(task: TaskConfig) -> tuple[list[Item], list[Item], dict[str, list[Item]]]:
    """The calibration items, training prompts (as Items without answers) and evaluation
    splits ("<domain>/<split>") of `task.files`, validated."""
    files = task.files
    pattern = None
    if files.spans.mode == "regex":  # checked before any file is read
        try:
            pattern = span_regex(files.spans.regex)
        except ValueError as err:
            raise TaskDataError(f"task.files.spans.regex: {err}") from None
    for key, holds in [("calibration", "the labeled examples (prompt and answer columns)"),
                       ("train", "the training prompts (a prompt column)")]:
        if getattr(files, key) is None:
            raise TaskDataError(f"task.files.{key} is not set: name the file of {holds}, "
                                f"e.g. task.files.{key}=data/{key}.jsonl")
    calibration = _calibration(task, pattern)
    train = _train(task)
    splits = {f"{task.domain}/{split}": _eval_split(task, split, path) for split, path in files.eval.items()}
    return calibration, train, splits


def _calibration(task: TaskConfig, pattern: re.Pattern | None) -> list[Item]:
    spans = task.files.spans
    fields = ["prompt", "answer", *(["answer_spans"] if spans.mode == "explicit" else [])]
    rows = _read(task, "calibration", task.files.calibration, fields, task.n_calibration,
                 "task.n_calibration", hints={"answer_spans": ", or find the spans by "
                                              "task.files.spans.rule or task.files.spans.regex"})
    items = []
    for row in rows:
        answer = row.required("answer", "a calibration example is a prompt with its reference answer")
        items.append(Item(
            id=row.id, domain=task.domain, split="calibration", answer=answer,
            prompt=row.required("prompt", "a calibration example needs its prompt"),
            span_rule=spans.rule or "",
            answer_spans=(regex_spans(answer, pattern, spans.match) if pattern else
                          row.spans(answer) if spans.mode == "explicit" else [])))
    # one example without spans is skipped (stage 1 counts it); none with any is an error
    if task.calibration_loss == "correctness" and items and not any(it.correctness_spans() for it in items):
        how = f"rule={spans.rule}" if spans.rule else f"regex='{spans.regex}'"
        raise TaskDataError(
            f"{task.files.calibration} (task.files.calibration): no row has a correctness span under "
            f"task.files.spans.{how} (row 1's answer ends {items[0].answer[-60:]!r}); fix the "
            f"{'rule' if spans.rule else 'regex'} or the answers")
    return items


def _needs(scorer: str) -> str:
    """The field a scorer reads (a user scorer reads the gold)."""
    return SCORERS[scorer].needs if scorer in SCORERS else "gold"


def _scored(task: TaskConfig, row: _Row, split: str, scorer: str) -> Item:
    """A row as an item its scorer can score: prompt, and what the scorer reads."""
    need = _needs(scorer)
    why = f"the {scorer} scorer of split {split} needs it"
    cells = {"answer": "", need: row.tests() if need == "tests" else row.required(need, why)}
    return Item(id=row.id, domain=task.domain, split=split,
                prompt=row.required("prompt", f"a{'n evaluation' if split != 'train' else ' training'} "
                                    "example needs its prompt"),
                setup=row.text("setup"), metric=scorer,
                pattern=task.files.scorer_regex or "" if scorer == "regex" else "", **cells)


def _train(task: TaskConfig) -> list[Item]:
    """The training prompts. Where the file also has what the evaluation scorer
    (task.files.scorer) reads, the items carry it, so that the raw corpus can be scored (the
    Table 3 check: stage 2's corpus quality, jobs/diagnose.py); generation and training read the
    prompts alone."""
    files, scorer = task.files, task.files.scorer
    need = _needs(scorer)
    answered = scorer not in SCORERS or SCORERS[scorer].accuracy
    rows = _read(task, "train", files.train, ["prompt"], task.n_train_prompts, "task.n_train_prompts",
                 optional=(need, "setup") if answered else ())
    if rows and answered and need in rows[0].cells:
        return [_scored(task, row, "train", scorer) for row in rows]
    return [Item(id=row.id, domain=task.domain, split="train", answer="", metric=None,
                 prompt=row.required("prompt", "a training prompt cannot be empty")) for row in rows]


def _eval_split(task: TaskConfig, split: str, path: str) -> list[Item]:
    scorer = task.files.scorer_of(split)
    need = _needs(scorer)
    name = f"{task.domain}/{split}"
    n = task.n_eval_splits.get(name, task.n_eval)
    asked_by = f"task.n_eval_splits[{name!r}]" if name in task.n_eval_splits else "task.n_eval"
    other = f", or choose another scorer than {scorer} for this split: task.files.split_scorers.{split}"
    rows = _read(task, f"eval.{split}", path, ["prompt", need], n, asked_by,
                 optional=("setup",) if need == "tests" else (), hints={need: other})
    return [_scored(task, row, split, scorer) for row in rows]


# ---------------------------------------------------------------------------------------
# reading a file's rows


@dataclass
class _Row:
    """One row of a task file: its cells by field (for the fields whose column the file has)."""
    at: str  # where an error points: "<file> (task.files.<key>), line <n> (id <id>)"
    id: str
    cells: dict[str, Any]
    columns: ColumnsConfig

    def _fault(self, field: str, problem: str) -> TaskDataError:
        return TaskDataError(f"{self.at}: column {getattr(self.columns, field)!r} ({HOLDS[field]}) {problem}")

    def text(self, field: str) -> str:
        """The cell as text: null is empty, a number (as JSON or Parquet types it) as written."""
        cell = self.cells.get(field)
        if cell is None or isinstance(cell, str):
            return cell or ""
        if isinstance(cell, int | float) and not isinstance(cell, bool):
            return str(cell)
        raise self._fault(field, f"holds {type(cell).__name__} {_short(cell)}, not text")

    def required(self, field: str, why: str) -> str:
        value = self.text(field)
        if not value.strip():
            raise self._fault(field, f"is empty: {why}; fill it in or drop the row")
        return value

    def _list(self, field: str, shape: str) -> list:
        """A list cell; CSV holds lists as JSON text."""
        cell = self.cells.get(field)
        if isinstance(cell, str):
            try:
                cell = json.loads(cell)
            except json.JSONDecodeError:
                raise self._fault(field, f"holds {_short(cell)}, not JSON: write {shape}") from None
        if not isinstance(cell, list) or not cell:
            raise self._fault(field, f"holds {_short(cell)}: write a non-empty list, {shape}")
        return cell

    def tests(self) -> list[str]:
        shape = '["assert f(1) == 2", ...] (in CSV as JSON text)'
        tests = self._list("tests", shape)
        if not all(isinstance(t, str) and t.strip() for t in tests):
            raise self._fault("tests", f"holds {_short(tests)}: each test must be a non-empty string, {shape}")
        return tests

    def spans(self, answer: str) -> list[tuple[int, int]]:
        """Explicit correctness spans, checked to lie inside the answer."""
        shape = "[[start, end], ...], character offsets into the answer, end exclusive (in CSV as JSON text)"
        spans = self._list("answer_spans", shape)
        out = []
        for span in spans:
            if not (isinstance(span, list) and len(span) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in span)):
                raise self._fault("answer_spans", f"holds {_short(spans)}: write {shape}")
            start, end = span
            if start < 0:
                raise self._fault("answer_spans", f"has span {span}, which starts before the answer, overlapping "
                                  "the prompt: offsets count from the answer's first character (0), and only "
                                  "the answer can be labeled")
            if end > len(answer):
                raise self._fault("answer_spans", f"has span {span}, which ends past the answer ({len(answer)} "
                                  f"characters): end at most {len(answer)}")
            if start >= end:
                raise self._fault("answer_spans", f"has span {span}, which is empty or reversed: need start < end")
            out.append((start, end))
        return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _read(task: TaskConfig, key: str, path: str, fields: list[str], n: int, asked_by: str,
          optional: tuple[str, ...] = (), hints: dict[str, str] | None = None) -> list[_Row]:
    """The first `n` rows of the file at `path` (config key task.files.<key>; `n` is the
    setting `asked_by`'s), with the columns of `fields` (which it must have), of `optional`
    where it has them, and the ids. `hints` end the message of a missing column, by field."""
    where = f"{path} (task.files.{key})"
    kind = _format(path, task.files.format, where)
    _check_file(path, where)
    names = task.files.columns
    hints = {"id": " (the same in every file), or unset it to number the rows", **(hints or {})}
    id_field = ["id"] if names.id is not None else []
    columns = {f: getattr(names, f) for f in [*id_field, *fields, *optional]}
    ds = _load(path, kind, where, list(columns.values()))
    for field in [*id_field, *fields]:
        if columns[field] not in ds.column_names:
            raise TaskDataError(
                f"{where} has no column {columns[field]!r} ({HOLDS[field]}); its columns: {ds.column_names}. "
                f"Name the one that holds it with task.files.columns.{field}=<column>{hints.get(field, '')}")
    places = _places(path, kind, len(ds))
    if len(ds) < n:
        console.warn(f"{where}: using all {len(ds)} rows of the {n} asked ({asked_by}): the file "
                     "holds no more")
    present = {f: c for f, c in columns.items() if c in ds.column_names}
    ds = ds.select(range(min(n, len(ds)))).select_columns(sorted(set(present.values())))
    rows, first_row = [], {}  # id -> where the row that has it is
    for number, (place, record) in enumerate(zip(places, ds.to_list()), start=1):
        cells = {f: record[c] for f, c in present.items()}
        row = _Row(f"{where}, {place}", str(number), cells, names)
        if id_field:
            item_id = row.required("id", "ids name the rows (unset task.files.columns.id to number them)")
            if item_id in first_row:
                raise TaskDataError(f"{where}: {first_row[item_id]} and {place} both have id "
                                    f"{item_id!r}: ids must be unique within a file; fix one, or "
                                    "unset task.files.columns.id to number the rows")
            first_row[item_id] = place
            row = _Row(f"{where}, {place} (id {item_id!r})", item_id, cells, names)
        rows.append(row)
    return rows


def _load(path: str, kind: str, where: str, columns: list[str]) -> datasets.Dataset:
    """The file as a `datasets` table, or an error in the reader's words (for JSON Lines: the
    line that is not JSON)."""
    # CSV: every cell as written (no numbers parsed, "007" stays), empty cells empty, not NaN
    extra = {"converters": {c: str for c in columns}, "na_filter": False} if kind == "csv" else {}
    try:
        return datasets.load_dataset(kind, data_files=path, split="train", **extra)
    except Exception as err:  # a malformed file, not this format, or no row
        bad = _bad_json_line(path) if kind == "json" else None
        if bad:
            raise TaskDataError(f"{where}: {bad}; fix or remove that line (JSON Lines: one JSON "
                                "object per line)") from err
        cause = err.__cause__ or err
        raise TaskDataError(f"{where}: cannot read it as {kind} ({type(cause).__name__}: {cause}); "
                            "fix the file (one row per example, at least one), or name its format "
                            "with task.files.format") from err


def _lines(path: str):
    """The file's text lines (fsspec: local or a URL; .gz decompressed)."""
    return fsspec.open(path, "rt", compression="infer", encoding="utf-8", errors="replace",
                       newline="")


def _bad_json_line(path: str) -> str | None:
    """The first line of a JSON Lines file that is not JSON, in words; None if every one is."""
    with _lines(path) as f:
        for number, text in enumerate(f, start=1):
            if number == 1 and text.lstrip().startswith("["):
                return None  # a JSON array, not JSON Lines
            try:
                if text.strip():
                    json.loads(text)
            except json.JSONDecodeError as err:
                return f"line {number} is not valid JSON ({err.msg}, column {err.colno})"
    return None


def _places(path: str, kind: str, n_records: int) -> list[str]:
    """Where each record is, as a person finds it: the line it starts on (JSON Lines, whose
    blank lines hold no record; CSV, under its header), else its row number (Parquet, a JSON
    array)."""
    starts: list[int] = []
    if kind == "json":
        with _lines(path) as f:
            starts = [number for number, text in enumerate(f, start=1) if text.strip()]
    elif kind == "csv":
        with _lines(path) as f:
            reader, line = csv.reader(f), 1
            for record in reader:  # a quoted cell may span lines
                if record:
                    starts.append(line)
                line = reader.line_num + 1
            starts = starts[1:]  # the header
    if len(starts) == n_records:
        return [f"line {number}" for number in starts]
    return [f"row {number}" for number in range(1, n_records + 1)]


def _format(path: str, fmt: str, where: str) -> str:
    """The `datasets` reader of a file: `fmt` (task.files.format), or auto: from its name."""
    if fmt != "auto":
        return fmt
    for ending, kind in FORMATS.items():
        if path.lower().endswith(ending):
            return kind
    raise TaskDataError(f"{where}: cannot tell the format from the file's name; name it with one of "
                        f"{list(FORMATS)}, or set task.files.format to json, parquet or csv")


def _check_file(path: str, where: str) -> None:
    """The file exists and is not empty (local paths and fsspec URLs alike)."""
    try:
        fs, inner = fsspec.core.url_to_fs(path)
        size = fs.size(inner) if fs.isfile(inner) else None
    except Exception as err:  # a missing fsspec backend (s3fs, gcsfs), credentials, the network
        raise TaskDataError(f"{where}: cannot reach {path} ({type(err).__name__}: {err}); check the URL, "
                            "its filesystem package and credentials") from err
    if size is None:
        raise TaskDataError(f"{where}: no such file; fix the path (a relative one starts at the working "
                            f"directory, {os.getcwd()})")
    if size == 0:
        raise TaskDataError(f"{where} is empty: give it one row per example")
