"""Evaluation on Ray: greedy completions from stage 2's generation actors, scored on the driver,
and the NLL of reference answers as Ray tasks.

The paper evaluates with greedy decoding, projection off, raw prompts (SPD_METHOD.md step 9).
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from pathlib import Path

import ray

from spd_ray import console
from spd_ray.config import EvalConfig, GenerationConfig, ModelConfig, SubspaceConfig
from spd_ray.core.modeling import load_tokenizer
from spd_ray.stages.generate import generate_dataset, load_projected
from spd_ray.tasks.evaluation import (
    accuracy_splits,
    check_scorers,
    nll_splits,
    reference_nll,
    split_metrics,
)
from spd_ray.tasks.item import Item


# max_calls=1: a fresh worker per call, so none stays holding GPU memory that vLLM would then
# miss (Ray makes a GPU task's worker single-use only when num_gpus is in the decorator);
# a pure function of its arguments: a lost worker or node reruns it elsewhere
@ray.remote(max_retries=3, max_calls=1)
def _reference_nll(model: ModelConfig, items: list, batch_size: int, subspace_dir: str | None,
                   mode: str, apply: str = SubspaceConfig.apply) -> float:
    with ExitStack() as hooks:
        net = load_projected(model, subspace_dir, mode, None if apply == "fold" else hooks)
        return reference_nll(net, load_tokenizer(model.path, model.trust_remote_code), items,
                             batch_size)


def evaluate_on_ray(model: ModelConfig, gen: GenerationConfig, ev: EvalConfig,
                    splits: dict[str, list[Item]], subspace_dir: str | Path | None = None,
                    mode: str = SubspaceConfig.mode,
                    apply: str = SubspaceConfig.apply) -> dict[str, float]:
    """Greedy completions from the generation actors, scored on the driver. Projection off,
    unless `subspace_dir` is given (the inference-only baseline: folded or by hooks, as `apply`
    says; with vLLM, from the folded checkpoint stage 2 uses too). The scorers are checked first
    (`check_scorers`): a bad one fails before any generation."""
    check_scorers(splits)
    subspace_dir = None if subspace_dir is None else str(subspace_dir)
    scored = accuracy_splits(splits)  # NLL-only splits need no completions
    rows = [{"id": f"{name}#{i}", "prompt": it.prompt}
            for name in scored for i, it in enumerate(splits[name])]
    greedy = dataclasses.replace(gen, batch_size=ev.batch_size)
    done = []
    if rows:
        ds = generate_dataset(ray.data.from_items(rows), model, greedy, greedy=True, subspace_dir=subspace_dir,
                              mode=mode, apply=apply, max_new_tokens=ev.max_new_tokens)
        with console.progress("generating", len(rows), unit="completions") as bar:
            done = list(bar.count(ds.iter_rows()))
    by_id = {r["id"]: r["completion"] for r in done}
    completions = {name: [by_id[f"{name}#{i}"] for i in range(len(splits[name]))] for name in scored}
    nll = {name: _reference_nll.options(num_cpus=gen.cpus_per_replica, num_gpus=gen.gpus_per_replica)
           .remote(model, splits[name], ev.batch_size, subspace_dir, mode, apply)
           for name in nll_splits(splits)}
    return split_metrics(splits, completions, {k: ray.get(v) for k, v in nll.items()}, ev)
