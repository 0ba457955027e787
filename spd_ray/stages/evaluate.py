"""Evaluation on Ray: greedy completions from stage 2's generation actors, scored on the driver,
and the NLL of reference answers as Ray tasks; and the raw corpus's accuracy (paper Table 3).

The paper evaluates with greedy decoding, projection off, raw prompts (docs/method.md,
"Evaluation").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import ray

from spd_ray import console, data
from spd_ray.config import EvalConfig, GenerationConfig, ModelConfig
from spd_ray.core.modeling import load_tokenizer
from spd_ray.stages.generate import (
    Projection,
    context_length,
    generate_dataset,
    load_projected,
    pool_started,
)
from spd_ray.tasks.evaluation import (
    accuracy_splits,
    answer_logprobs,
    check_scorers,
    metrics_of,
    nll_splits,
    reference_nll,
    score,
    score_splits,
)
from spd_ray.tasks.item import Item


@dataclass
class EvalResult:
    """An evaluation: metric name (`<split>/accuracy`, `<split>/nll`) -> value, and each item's
    correctness by split as a string of 0/1 in the split's order (the report's paired intervals
    compare methods item by item), saved as JSON."""
    metrics: dict[str, float]
    correct: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> EvalResult:
        return cls(**json.loads(Path(path).read_text()))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1))

    def summary(self) -> str:
        """Each split's accuracy on one line, with its reference NLL where there is one."""
        parts: dict[str, list[str]] = {}
        for key, value in self.metrics.items():
            split, _, kind = key.rpartition("/")
            parts.setdefault(split, []).append(f"{value:.3f}" if kind == "accuracy" else f"{kind} {value:.3f}")
        return ", ".join(f"{split} {' '.join(vals)}" for split, vals in parts.items())


# max_calls=1: a fresh worker per call, so none stays holding GPU memory that vLLM would then
# miss (Ray makes a GPU task's worker single-use only when num_gpus is in the decorator);
# a pure function of its arguments: a lost worker or node reruns it elsewhere
@ray.remote(max_retries=3, max_calls=1)
def _reference_nll(model: ModelConfig, items: list, batch_size: int,
                   projection: Projection | None) -> float:
    with ExitStack() as hooks:  # projection.apply=hooks: on for this call
        net = load_projected(model, projection, hooks)
        return reference_nll(net, load_tokenizer(model.path, model.trust_remote_code), items,
                             batch_size)


# the same single-use worker as `_reference_nll`
@ray.remote(max_retries=3, max_calls=1)
def _answer_logprobs(model: ModelConfig, prompts: list[str], answers: list[str], batch_size: int,
                     projection: Projection | None) -> list[tuple[float, int]]:
    with ExitStack() as hooks:
        net = load_projected(model, projection, hooks)
        return answer_logprobs(net, load_tokenizer(model.path, model.trust_remote_code), prompts, answers,
                               batch_size)


def answer_logprobs_on_ray(model: ModelConfig, gen: GenerationConfig, prompts: list[str], answers: list[str],
                           batch_size: int, projection: Projection | None = None) -> list[tuple[float, int]]:
    """`tasks.evaluation.answer_logprobs` of `model` with K/V projected as `projection` says
    (None: the plain model), on one generation replica's resources: how likely the model makes
    each answer, teacher-forced, under the projection."""
    task = _answer_logprobs.options(num_cpus=gen.cpus_per_replica, num_gpus=gen.gpus_per_replica)
    return ray.get(task.remote(model, list(prompts), list(answers), batch_size, projection))


def evaluate_on_ray(model: ModelConfig, ev: EvalConfig, splits: dict[str, list[Item]], out: Path,
                    gen: GenerationConfig, projection: Projection | None = None) -> EvalResult:
    """Greedy completions of `model` from the generation actors (`gen`'s backend and replicas),
    scored on the driver, saved in `out`. Projection off, unless `projection` is given (the
    inference-only baseline: folded or by hooks, as its `apply` says; with vLLM, from the folded
    checkpoint stage 2 uses too). The scorers are checked first (`check_scorers`): a bad one fails
    before any generation."""
    check_scorers(splits)
    scored = accuracy_splits(splits)  # NLL-only splits need no completions
    rows = [{"id": f"{name}#{i}", "prompt": it.prompt}
            for name in scored for i, it in enumerate(splits[name])]
    greedy = dataclasses.replace(gen, batch_size=ev.batch_size)
    done = []
    if rows:
        context = context_length(model, greedy, [r["prompt"] for r in rows], ev.max_new_tokens)
        ds = generate_dataset(ray.data.from_items(rows), model, greedy, context=context, greedy=True,
                              projection=projection, max_new_tokens=ev.max_new_tokens)
        with pool_started(greedy), console.progress("generating", len(rows), unit="completions") as bar:
            done = list(bar.count(ds.iter_rows()))
    by_id = {r["id"]: r["completion"] for r in done}
    completions = {name: [by_id[f"{name}#{i}"] for i in range(len(splits[name]))] for name in scored}
    nll = {name: _reference_nll.options(num_cpus=gen.cpus_per_replica, num_gpus=gen.gpus_per_replica)
           .remote(model, splits[name], ev.batch_size, projection) for name in nll_splits(splits)}
    correct = score_splits(splits, completions, ev)
    result = EvalResult(metrics_of(correct, {k: ray.get(v) for k, v in nll.items()}),
                        {name: bits(c) for name, c in correct.items()})
    result.save(out)
    return result


def bits(correct) -> str:
    """Correctness as a string of 0/1: compact in JSON, one character per item."""
    return "".join("1" if c else "0" for c in correct)


@dataclass
class CorpusQuality:
    """How often the raw corpus is right before any training (paper Table 3): `accuracy` is None
    where the prompts come without answers (task.source=files). By row id: `correct`, each row's
    correctness (0/1), and `hashes`, a digest of each completion, so that two corpora of the same
    prompts and seed compare row by row (how many samples the projection changed)."""
    accuracy: float | None
    n: int
    mean_chars: float
    correct: dict[str, int] | None = None
    hashes: dict[str, str] | None = None

    @classmethod
    def load(cls, path: Path) -> CorpusQuality:
        return cls(**json.loads(Path(path).read_text()))

    def summary(self) -> str:
        if self.accuracy is None:
            return "no answers to score it by"
        return f"raw corpus accuracy {self.accuracy:.3f} (a diagnostic: nothing is filtered)"


def corpus_quality(train_items: list[Item], generations: Path, ev: EvalConfig, out: Path) -> CorpusQuality:
    """Stage 2's corpus scored against the training prompts' answers, saved in `out`: a
    diagnostic, the only use of those answers; nothing is filtered by it."""
    rows = data.read_corpus(generations).select(["id", "completion"]).to_pylist()
    items = [train_items[int(r["id"].split("-")[0])] for r in rows]
    accuracy = correct = None
    if items and items[0].metric:
        right = score(items, [r["completion"] for r in rows], ev)
        accuracy, correct = sum(right) / len(rows), {r["id"]: int(c) for r, c in zip(rows, right, strict=True)}
    hashes = {r["id"]: hashlib.sha1(r["completion"].encode()).hexdigest()[:10] for r in rows}
    result = CorpusQuality(accuracy, len(rows), sum(len(r["completion"]) for r in rows) / max(1, len(rows)),
                           correct, hashes)
    Path(out).write_text(json.dumps(dataclasses.asdict(result)))
    return result
