"""Stage 2 on Ray Data: an actor pool of model replicas generates completions.

Each actor loads one replica in `__init__`, with the projection folded into a copy of the
weights (default) or applied by hooks; rows carry their own sampling seed, so the samples do
not depend on how many replicas there are or which one a row lands on. Evaluation
(`spd_ray.stages.evaluate`) uses the same actors with greedy decoding and no projection.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray

from spd_ray import console, data
from spd_ray.config import GenerationConfig, ModelConfig, SubspaceConfig
from spd_ray.core.generation import generate
from spd_ray.core.modeling import load_model, load_tokenizer
from spd_ray.core.projection import fold_projection, projection_hooks
from spd_ray.core.subspace import CapabilitySubspace


@dataclass(frozen=True)
class Projection:
    """K and V projected onto the capability subspace saved in `subspace_dir` (stage 2, and the
    inference-only evaluation): `mode` both, k_only or v_only; `apply` fold (into a copy of the
    weights) or hooks (on the k_proj / v_proj outputs): the same outputs."""
    subspace_dir: str
    mode: str = SubspaceConfig.mode
    apply: str = SubspaceConfig.apply

    @classmethod
    def of(cls, subspace_dir: str | Path | None, subspace: SubspaceConfig) -> Projection | None:
        """The run's projection onto `subspace_dir`; None (no projection) without one."""
        if subspace_dir is None:
            return None
        return cls(str(subspace_dir), subspace.mode, subspace.apply)


def load_projected(model: ModelConfig, projection: Projection | None,
                   hooks: ExitStack | None = None):
    """The model (eval mode) with K/V projected as `projection` says (None: the plain model):
    folded into a copy of the weights, or, given `hooks`, by forward hooks that stay on until
    `hooks` is closed."""
    net = load_model(model.path, model.dtype, model.device, model.trust_remote_code)
    if projection is None:
        return net
    subspace = CapabilitySubspace.load(projection.subspace_dir)
    if hooks is None:
        return fold_projection(net, subspace, projection.mode)
    hooks.enter_context(projection_hooks(net, subspace, projection.mode))
    return net


class Generator:
    """A Ray Data callable class: one model replica per actor."""

    def __init__(self, model: ModelConfig, gen: GenerationConfig, projection: Projection | None,
                 greedy: bool, max_new_tokens: int):
        self._hooks = ExitStack()  # apply=hooks: the projection hooks, on for the actor's lifetime
        hooks = None if projection is None or projection.apply == "fold" else self._hooks
        self.model = load_projected(model, projection, hooks)
        self.tokenizer = load_tokenizer(model.path, model.trust_remote_code)
        self.node = ray.get_runtime_context().get_node_id()
        self.kwargs = dict(max_new_tokens=max_new_tokens, batch_size=gen.batch_size)
        if not greedy:
            self.kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seeds = [int(s) for s in batch["seed"]] if "seed" in batch else None
        completions = generate(self.model, self.tokenizer, [str(p) for p in batch["prompt"]],
                               seeds=seeds, **self.kwargs)
        return {**batch, "completion": np.array(completions, dtype=object),
                "node": np.array([self.node] * len(completions), dtype=object)}

    def __del__(self):
        self._hooks.close()


class VLLMGenerator:
    """The vLLM backend (GPU clusters): generates from a saved checkpoint that already has the
    projection folded in, so vLLM needs no hooks; each row keeps its own sampling seed."""

    def __init__(self, checkpoint: str, model: ModelConfig, gen: GenerationConfig, greedy: bool,
                 max_new_tokens: int):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as err:
            raise ImportError("generation.backend=vllm needs vLLM (pip install vllm) on the "
                              "generation nodes; or use generation.backend=hf") from err
        dtype = "auto" if model.dtype == "auto" else model.dtype
        self.llm = LLM(model=checkpoint, dtype=dtype, trust_remote_code=model.trust_remote_code)
        self.params = SamplingParams
        self.sampling = dict(max_tokens=max_new_tokens, temperature=0.0)
        if not greedy:
            self.sampling.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k or -1)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seeds = batch["seed"] if "seed" in batch else [None] * len(batch["prompt"])
        params = [self.params(seed=None if s is None else int(s), **self.sampling) for s in seeds]
        outputs = self.llm.generate([str(p) for p in batch["prompt"]], params)
        completions = [o.outputs[0].text for o in outputs]
        return {**batch, "completion": np.array(completions, dtype=object),
                "node": np.array([self.node] * len(completions), dtype=object)}


# a pure function of its arguments: a lost worker or node reruns it elsewhere
@ray.remote(max_retries=3)
def save_folded_checkpoint(model: ModelConfig, projection: Projection, out: str) -> str:
    """A Hugging Face folder of the model with the projection folded into k_proj/v_proj."""
    load_projected(model, projection).save_pretrained(out)
    load_tokenizer(model.path, model.trust_remote_code).save_pretrained(out)
    return out


def generate_dataset(ds: ray.data.Dataset, model: ModelConfig, gen: GenerationConfig, *,
                     projection: Projection | None = None, greedy: bool = False,
                     max_new_tokens: int | None = None,
                     folded_checkpoint: str | Path | None = None) -> ray.data.Dataset:
    """`ds` (columns prompt, id, and seed unless greedy) with `completion` and `node` (the
    replica's Ray node) columns added, K/V projected as `projection` says (None: the plain
    model).

    With `gen.backend == "vllm"`, a projected run generates from `folded_checkpoint` (written by
    `save_folded_checkpoint`)."""
    max_new_tokens = max_new_tokens or gen.max_new_tokens
    if gen.backend == "vllm":
        if projection is not None and folded_checkpoint is None:
            raise ValueError("the vLLM backend projects through a folded checkpoint: pass "
                             "folded_checkpoint (see save_folded_checkpoint)")
        checkpoint = model.path if projection is None else str(folded_checkpoint)
        udf, kwargs = VLLMGenerator, dict(checkpoint=checkpoint, model=model, gen=gen,
                                          greedy=greedy, max_new_tokens=max_new_tokens)
    else:
        udf, kwargs = Generator, dict(model=model, gen=gen, projection=projection, greedy=greedy,
                                      max_new_tokens=max_new_tokens)
    return ds.map_batches(
        udf,
        fn_constructor_kwargs=kwargs,
        batch_size=gen.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=gen.replicas_min, max_size=gen.replicas_max),
        num_cpus=gen.cpus_per_replica,
        num_gpus=gen.gpus_per_replica,
        # a lost replica (or node) is restarted and its batches retried elsewhere, without limit:
        # a row's text depends on its own seed alone, so a retried batch samples the same text
        max_restarts=-1,
        max_task_retries=-1,
    )


# ---------------------------------------------------------------------------------------
# The stage's driver.


@dataclass
class GenerationResult:
    """Stage 2's outcome: the raw corpus in `path` (part files), how many of the `rows` asked
    for were kept (all but empty completions), and a few of them."""
    path: Path
    rows: int
    kept: int
    mean_chars: float
    samples: list[dict] = field(default_factory=list)  # the first rows, for a look
    samples_per_s: float | None = None  # where they were generated in this run

    @classmethod
    def load(cls, path: Path, rows: int) -> GenerationResult:
        kept = data.read_corpus(path)
        chars = [len(c) for c in kept.column("completion").to_pylist()]
        return cls(Path(path), rows, kept.num_rows, sum(chars) / max(1, kept.num_rows),
                   kept.select(["id", "prompt", "completion"]).slice(0, 32).to_pylist())

    def summary(self) -> str:
        made = f"{self.samples_per_s:.1f} samples/s, " if self.samples_per_s else ""
        return f"{self.kept} completions kept of {self.rows}, {made}mean {self.mean_chars:.0f} chars"


def self_generate(model: ModelConfig, gen: GenerationConfig, prompts: list[str], out: Path,
                  projection: Projection | None) -> GenerationResult:
    """Stage 2: `gen.n_samples` raw completions per prompt from the actor pool, K/V projected
    onto the capability subspace (None: unprojected, the PSR / SSD baselines), written to `out`
    in part files as they arrive; rows already there (a killed run's) are not generated again.
    Nothing is filtered but empty completions, which are counted."""
    start = time.time()
    rows = data.sampling_rows(prompts, gen.n_samples, gen.seed)
    out.mkdir(parents=True, exist_ok=True)
    done = data.written_ids(out)
    todo = [r for r in rows if r["id"] not in done]
    if done:
        console.log(f"  {len(done)} of {len(rows)} rows already written; generating the other {len(todo)}")
    if todo:
        folded = None
        if gen.backend == "vllm" and projection is not None:  # vLLM reads weights from disk
            folded = ray.get(save_folded_checkpoint.options(num_gpus=gen.gpus_per_replica).remote(
                model, projection, str(out.with_name("folded_model"))))
        ds = generate_dataset(ray.data.from_items(todo), model, gen, projection=projection,
                              folded_checkpoint=folded)
        with console.progress("generating", len(rows), done=len(done), unit="rows") as bar:
            batches = ds.iter_batches(batch_size=gen.batch_size, batch_format="pyarrow")
            data.write_parts(bar.count(batches, lambda batch: batch.num_rows), out,
                             rows_per_part=gen.batch_size * max(1, gen.replicas_max))
    written = data.written_ids(out)
    if written != {r["id"] for r in rows}:  # every id exactly once (a part holds each row once)
        raise RuntimeError(f"stage 2 wrote {len(written)} of {len(rows)} rows to {out}")
    result = GenerationResult.load(out, len(rows))
    if not result.kept:  # the rows stay written: a rerun with another generation config starts afresh
        raise RuntimeError(f"stage 2: all {len(rows)} completions are empty, nothing to train on; "
                           f"check generation.max_new_tokens ({gen.max_new_tokens}) and the model's prompts")
    if result.kept < len(rows):
        console.warn(f"stage 2: {len(rows) - result.kept} of {len(rows)} completions are empty; "
                     "they are left out of training")
    result.samples_per_s = len(todo) / (time.time() - start)
    return result
