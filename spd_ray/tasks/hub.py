"""The paper's benchmarks (docs/method.md, "Evaluation") as testbed Items, through `datasets`.

Per domain: calibration examples and training prompts (disjoint) from one pool shuffled with
`task.seed`, then the evaluation splits.
- math: pool GSM8K train; test GSM8K test (first n); transfer SVAMP test (first n);
- mcq: pool MMLU auxiliary_train; test MMLU test (first n); transfer BBH, six subtasks x n // 6;
- code: pool MBPP (full) train + validation; test MBPP sanitized test (first n, pass@1 of its
  asserts); transfer CodeAlpaca-20k (last n, scored by the NLL of the reference only).
Prompts use the testbed's layouts, so correctness spans and scorers apply unchanged.

Names come from `task.hub_datasets`. With `task.data_dir` set, each (dataset, config, split) is
read from a local copy in the hub schema: <data_dir>/<name>/<config or "default">/<split>.jsonl,
<split>.parquet or the hub's shards <split>-*.parquet (BBH: one config folder per subtask).
"""

from __future__ import annotations

import random
from pathlib import Path

import datasets

from spd_ray.config import TaskConfig
from spd_ray.tasks.item import LETTERS, Item
from spd_ray.tasks.scoring import extract_number

BBH_TASKS = ("logical_deduction_three_objects", "date_understanding", "movie_recommendation",
             "boolean_expressions", "causal_judgement", "sports_understanding")
# the fields each benchmark's rows must have (in its hub schema)
FIELDS = {
    "gsm8k": ["question", "answer"],
    "svamp": ["Body", "Question", "Equation", "Answer"],
    "mmlu": ["question", "choices", "answer"],
    "bbh": ["input", "target"],
    "mbpp": ["text", "code", "test_list", "test_setup_code"],
    "mbpp_sanitized": ["prompt", "code", "test_list", "test_imports"],
    "codealpaca": ["instruction", "input", "output"],
}
# datasets >= 4 runs no loading scripts: these are read from the hub's parquet export instead
# (branch refs/convert/parquet, <config>/<split>/*.parquet)
PARQUET_EXPORT = {"lukaemon/bbh"}


def local_folder(data_dir: str | Path, name: str, config: str | None) -> Path:
    return Path(data_dir) / name / (config or "default")


def _local_files(folder: Path, split: str) -> list[Path]:
    for pattern in (f"{split}.jsonl", f"{split}.parquet", f"{split}-*.parquet"):
        if files := sorted(folder.glob(pattern)):
            return files
    return []


def _spec(task: TaskConfig, benchmark: str, config: str | None) -> tuple[str, str | None]:
    name, _, default_config = task.hub_datasets[benchmark].partition(":")
    return name, config or default_config or None


def load_rows(task: TaskConfig, benchmark: str, split: str, config: str | None = None) -> datasets.Dataset:
    """One split of a benchmark, from the hub or from `task.data_dir`, with its needed fields."""
    name, config = _spec(task, benchmark, config)
    where = f"{benchmark} ({name}{f', config {config}' if config else ''}, split {split})"
    folder = local_folder(task.data_dir or "<data_dir>", name, config)
    if task.data_dir is not None:
        files = _local_files(folder, split)
        if not files:
            raise FileNotFoundError(
                f"{where}: no local copy at {folder}/{split}.jsonl, {split}.parquet or {split}-*.parquet "
                f"(task.data_dir={task.data_dir}). Write one in the hub schema, e.g. "
                f"datasets.load_dataset({name!r}, {config!r}, split={split!r}).to_json(...), "
                "or set task.data_dir to null to load from the hub")
        kind = "json" if files[0].suffix == ".jsonl" else "parquet"
        rows = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    else:
        try:
            if name in PARQUET_EXPORT:
                files = f"hf://datasets/{name}@refs%2Fconvert%2Fparquet/{config}/{split}/*.parquet"
                rows = datasets.load_dataset("parquet", data_files=files, split="train")
            else:
                rows = datasets.load_dataset(name, config, split=split)
        except Exception as err:  # any failure: network, offline mode, a wrong name or config
            raise RuntimeError(
                f"cannot load {where} from the Hugging Face hub ({type(err).__name__}: {err}). "
                f"Check task.hub_datasets.{benchmark} and the network, run with HF_HUB_OFFLINE=0 "
                "HF_DATASETS_OFFLINE=0 (the pipeline defaults both to 1), or set task.data_dir to a "
                f"folder with a local copy at {folder}/{split}.jsonl") from err
    missing = [f for f in FIELDS[benchmark] if f not in rows.column_names]
    if missing:
        raise ValueError(f"{where} lacks the field(s) {missing} of its hub schema; it has {rows.column_names}")
    return rows.select_columns(FIELDS[benchmark])


# ---------------------------------------------------------------------------------------
# rows -> Items, in the testbed's prompt layouts


def _gsm8k(row: dict, split: str, item_id: str) -> Item:
    return Item(id=item_id, domain="math", split=split, prompt=f"Question: {row['question']}\nAnswer:",
                answer=f" {row['answer']}", gold=extract_number(row["answer"]) or "",
                span_rule="final_number")


def _svamp(row: dict, split: str, item_id: str) -> Item:
    gold = extract_number(str(row["Answer"])) or ""  # a float: 8.0 -> "8"
    question = f"{row['Body'].strip()} {row['Question'].strip()}"
    return Item(id=item_id, domain="math", split=split, prompt=f"Question: {question}\nAnswer:",
                answer=f" {row['Equation'].strip()} = {gold}\n#### {gold}", gold=gold,
                span_rule="final_number")


def _mmlu(row: dict, split: str, item_id: str) -> Item:
    listing = "\n".join(f"{c}. {o}" for c, o in zip(LETTERS, row["choices"]))
    gold = LETTERS[row["answer"]]
    return Item(id=item_id, domain="mcq", split=split, prompt=f"Question: {row['question']}\n{listing}\nAnswer:",
                answer=f" {gold}", gold=gold, span_rule="answer_letter")


def _bbh(row: dict, split: str, item_id: str) -> Item:
    return Item(id=item_id, domain="mcq", split=split, prompt=f"Q: {row['input']}\nA:", answer=f" {row['target']}",
                gold=row["target"], span_rule="answer_letter", metric="normalized")


def _mbpp_item(item_id: str, split: str, instruction: str, code: str, tests: list[str], setup: str) -> Item:
    prompt = (f"Instruction: {instruction}\nYour code should pass these tests:\n" + "\n".join(tests)
              + "\nCode:\n")
    code = code.replace("\r\n", "\n").strip("\n") + "\n"  # MBPP's code has Windows line ends
    return Item(id=item_id, domain="code", split=split, prompt=prompt, answer=code, tests=list(tests),
                span_rule="asserts", setup=setup)


def _mbpp(row: dict, split: str, item_id: str) -> Item:
    return _mbpp_item(item_id, split, row["text"], row["code"], row["test_list"], row["test_setup_code"])


def _mbpp_sanitized(row: dict, split: str, item_id: str) -> Item:
    return _mbpp_item(item_id, split, row["prompt"], row["code"], row["test_list"], "\n".join(row["test_imports"]))


def _codealpaca(row: dict, split: str, item_id: str) -> Item:
    given = f"### Input:\n{row['input']}\n" if row["input"].strip() else ""
    return Item(id=item_id, domain="code", split=split,
                prompt=f"### Instruction:\n{row['instruction']}\n{given}### Response:\n",
                answer=row["output"], span_rule="asserts", metric="nll")


# domain -> (benchmark, its splits that make the pool, row maker)
POOLS = {"math": ("gsm8k", ["train"], _gsm8k), "mcq": ("mmlu", ["auxiliary_train"], _mmlu),
         "code": ("mbpp", ["train", "validation"], _mbpp)}
# (domain, split) -> (benchmark, its split, row maker, take the last n rather than the first)
EVALS = {("math", "test"): ("gsm8k", "test", _gsm8k, False),
         ("math", "transfer"): ("svamp", "test", _svamp, False),
         ("mcq", "test"): ("mmlu", "test", _mmlu, False),
         ("code", "test"): ("mbpp_sanitized", "test", _mbpp_sanitized, False),
         ("code", "transfer"): ("codealpaca", "train", _codealpaca, True)}


def calibration_and_train(task: TaskConfig) -> tuple[list[Item], list[Item]]:
    """n_calibration labeled examples and the next n_train_prompts of the shuffled pool."""
    benchmark, splits, make = POOLS[task.domain]
    pool = datasets.concatenate_datasets([load_rows(task, benchmark, s) for s in splits])
    need = task.n_calibration + task.n_train_prompts
    if need > len(pool):
        raise ValueError(
            f"{benchmark} {'+'.join(splits)} has {len(pool)} rows, fewer than task.n_calibration + "
            f"task.n_train_prompts = {need}: lower n_train_prompts to at most {len(pool) - task.n_calibration}")
    order = list(range(len(pool)))
    random.Random(task.seed).shuffle(order)
    source = f"{benchmark}/{'+'.join(splits)}"
    items = [make(pool[i], "calibration" if k < task.n_calibration else "train", f"{source}/{i}")
             for k, i in enumerate(order[:need])]
    return items[: task.n_calibration], items[task.n_calibration :]


def eval_split(task: TaskConfig, domain: str, split: str, n: int) -> list[Item]:
    """The evaluation split `<domain>/<split>` with at most n items."""
    if (domain, split) == ("mcq", "transfer"):  # the first n // 6 of each BBH subtask
        per_task, items = max(1, n // len(BBH_TASKS)), []
        for sub in BBH_TASKS:
            rows = load_rows(task, "bbh", "test", config=sub)
            items += [_bbh(rows[i], split, f"bbh/{sub}/{i}") for i in range(min(per_task, len(rows)))]
        return items
    if (domain, split) not in EVALS:
        raise ValueError(f"the hub source has no split {domain}/{split}; it has "
                         f"{sorted({f'{d}/{s}' for d, s in EVALS} | {'mcq/transfer'})}")
    benchmark, source, make, from_end = EVALS[(domain, split)]
    rows = load_rows(task, benchmark, source)
    picked = range(max(0, len(rows) - n), len(rows)) if from_end else range(min(n, len(rows)))
    return [make(rows[i], split, f"{benchmark}/{source}/{i}") for i in picked]
