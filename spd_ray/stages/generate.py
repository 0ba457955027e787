"""Stage 2 on Ray Data: an actor pool of model replicas generates completions.

Each actor loads one replica in `__init__`, with the projection folded into the weights (default:
once, into a checkpoint beside the subspace that every replica loads) or applied by hooks; rows
carry their own sampling seed, so on the HF backend the samples do not depend on how many
replicas there are or which one a row lands on (vLLM: see `VLLMGenerator`). Evaluation (`spd_ray.stages.evaluate`) uses the same actors with greedy
decoding and no projection (the inference-only baseline: with it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch

from spd_ray import console, data
from spd_ray.config import ConfigError, GenerationConfig, ModelConfig, SubspaceConfig
from spd_ray.core.batching import pad_id, right_pad, rows_that_fit
from spd_ray.core.generation import generate
from spd_ray.core.modeling import (
    bytes_per_token,
    context_window,
    from_pretrained,
    load_model,
    load_tokenizer,
    resolve_dtype,
    torch_device,
)
from spd_ray.core.projection import energy_outside, fold_projection, projection_hooks
from spd_ray.core.subspace import CapabilitySubspace


@dataclass(frozen=True)
class Projection:
    """K and V projected onto the capability subspace saved in `subspace_dir` (stage 2, and the
    inference-only evaluation): `mode` both, k_only or v_only; `apply` fold (into the weights)
    or hooks (on the k_proj / v_proj outputs): the same outputs."""
    subspace_dir: str
    mode: str = SubspaceConfig.mode
    apply: str = SubspaceConfig.apply
    beta: float = SubspaceConfig.beta  # soft projection: P + beta (I - P)

    @classmethod
    def of(cls, subspace_dir: str | Path | None, subspace: SubspaceConfig) -> Projection | None:
        """The run's projection onto `subspace_dir`; None (no projection) without one."""
        if subspace_dir is None:
            return None
        return cls(str(subspace_dir), subspace.mode, subspace.apply, subspace.beta)


def _folded_on_cpu(model: ModelConfig, projection: Projection, dtype: torch.dtype):
    """The model on the CPU with the projection folded into its own weights (one copy of them)."""
    net = from_pretrained(model.path, dtype, model.trust_remote_code).eval()
    return fold_projection(net, CapabilitySubspace.load(projection.subspace_dir), projection.mode,
                           inplace=True, beta=projection.beta)


def load_projected(model: ModelConfig, projection: Projection | None,
                   hooks: ExitStack | None = None):
    """The model (eval mode, on `model.device`) with K/V projected as `projection` says (None:
    the plain model): folded into the weights, or, given `hooks` (and `projection.apply=hooks`),
    by forward hooks that stay on until `hooks` is closed. The fold is done on the CPU before the
    model moves to its device, so a GPU never holds two copies (a 7B/8B model on 24 GB)."""
    if projection is None or projection.apply == "hooks":
        net = load_model(model.path, model.dtype, model.device, model.trust_remote_code)
        if projection is not None:
            if hooks is None:
                raise ValueError("subspace.apply=hooks needs an ExitStack to hold the hooks")
            subspace = CapabilitySubspace.load(projection.subspace_dir)
            hooks.enter_context(projection_hooks(net, subspace, projection.mode, projection.beta))
        return net
    dtype = resolve_dtype(model.dtype, model.device)
    return _folded_on_cpu(model, projection, dtype).to(torch_device(model.device))


def context_length(model: ModelConfig, gen: GenerationConfig, prompts: list[str],
                   max_new_tokens: int) -> int:
    """The tokens a row may take, measured on the driver before any replica starts: the
    longest of `prompts` (tokenized as generation tokenizes them) plus `max_new_tokens`. It
    sizes vLLM's engine (max_model_len: a prompt as long as it is refused, a longer context cut
    short) and the HF replicas' batches, so both backends generate the same for every prompt.
    A context beyond the model's, or `generation.max_model_len` set below it, is refused."""
    tokenizer = load_tokenizer(model.path, model.trust_remote_code)
    longest = max((len(ids) for ids in tokenizer(list(prompts))["input_ids"]), default=0)
    need = longest + max_new_tokens
    window = context_window(model.path, model.trust_remote_code)
    if window and need > window:
        raise ConfigError(f"the longest prompt has {longest} tokens: with {max_new_tokens} new tokens "
                          f"that is {need}, more than the {window} positions of {model.path}; lower "
                          "generation.max_new_tokens / evaluation.max_new_tokens, or shorten the prompts")
    if gen.backend == "vllm" and gen.max_model_len is not None and gen.max_model_len < need:
        raise ConfigError(f"generation.max_model_len={gen.max_model_len} is shorter than the longest "
                          f"prompt ({longest} tokens) plus {max_new_tokens} new tokens: set "
                          f"generation.max_model_len={need}, or leave it unset (sized from the prompts)")
    return gen.max_model_len if gen.backend == "vllm" and gen.max_model_len else need


class Generator:
    """A Ray Data callable class: one model replica per actor. On a GPU its rows decoding at
    once are `gen.batch_size`, or fewer where the KV cache of rows of `context` tokens would not
    fit in the memory the weights leave (`core.batching.rows_that_fit`)."""

    def __init__(self, model: ModelConfig, gen: GenerationConfig, projection: Projection | None,
                 greedy: bool, max_new_tokens: int, context: int):
        self._hooks = ExitStack()  # apply=hooks: the projection hooks, on for the actor's lifetime
        self.model = load_projected(model, projection, self._hooks)
        self.tokenizer = load_tokenizer(model.path, model.trust_remote_code)
        self.node = ray.get_runtime_context().get_node_id()
        batch_size = gen.batch_size
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            if gen.gpus_per_replica < 1:  # replicas that share a GPU: this one's share of it
                free = min(free, int(total * gen.gpus_per_replica) - torch.cuda.memory_allocated(device))
            per_token = bytes_per_token(model.path, next(self.model.parameters()).dtype,
                                        model.trust_remote_code)
            batch_size = rows_that_fit(free, per_token, context, batch_size)
        self.kwargs = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
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


# vLLM 0.29 has batch-invariant kernels for CUDA compute capability 8.x (Triton matmuls) and
# 9.0+ (cuBLAS without split-k): vllm/model_executor/determinism/batch_invariant.py
BATCH_INVARIANT_CAPABILITY = 80


def _batch_invariance() -> None:
    """VLLM_BATCH_INVARIANT=1 (unless the user set it) where this GPU has the kernels, before
    vLLM reads it (generation.batch_invariant). NVML answers, so CUDA is not initialized before
    vLLM starts."""
    from vllm.platforms import current_platform

    if current_platform.has_device_capability(BATCH_INVARIANT_CAPABILITY):
        os.environ.setdefault("VLLM_BATCH_INVARIANT", "1")


class VLLMGenerator:
    """The vLLM backend (GPU clusters): generates from a saved checkpoint that already has the
    projection folded in (`folded_checkpoint`), so vLLM needs no hooks.

    What holds for a row's sample: its `seed` keys vLLM's noise (v1/worker/gpu/sample/gumbel.py
    draws from the request's seed and position), but its logits depend on the other requests of
    the engine's batch unless vLLM runs batch-invariant (`generation.batch_invariant`, off by
    default: it routes every matmul through Triton kernels on compute capability 8.x and slows
    tensor-parallel communication). So a retried block may sample other texts for the same
    seeds: still one per row, which is all stage 2's resume relies on (rows written are kept, the
    others generated). The HF backend is batch-invariant on CPU (tests/test_generation.py); on
    GPU its kernels may change the last bits of the logits with a batch's padding (untested).

    The engine's context is `context` (`context_length`: the longest prompt plus the new
    tokens). Its engine processes outlive the actor unless shut down (vLLM 0.29's `LLM` has no
    shutdown of its own; Ray's vLLM stage shuts its engine down the same way): `__del__` does it
    when the actor exits gracefully, which Ray Data brings about as the pool ends."""

    def __init__(self, checkpoint: str, model: ModelConfig, gen: GenerationConfig, greedy: bool,
                 max_new_tokens: int, context: int):
        try:
            if gen.batch_invariant:
                _batch_invariance()
            from vllm import LLM, SamplingParams
        except ImportError as err:
            raise ImportError("generation.backend=vllm needs vLLM on the generation nodes "
                              "(pip install -e '.[vllm]' in the clone; the cluster files install "
                              "it on GPU nodes); or use generation.backend=hf") from err
        self.llm = LLM(model=checkpoint, dtype=model.dtype, trust_remote_code=model.trust_remote_code,
                       max_model_len=context,
                       gpu_memory_utilization=gen.gpu_memory_utilization,
                       enforce_eager=gen.enforce_eager, tensor_parallel_size=gen.tensor_parallel_size)
        self.params = SamplingParams
        self.sampling = dict(max_tokens=max_new_tokens, temperature=0.0)
        if not greedy:
            self.sampling.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k or -1)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seeds = batch["seed"] if "seed" in batch else [None] * len(batch["prompt"])
        params = [self.params(seed=None if s is None else int(s), **self.sampling) for s in seeds]
        outputs = self.llm.generate([str(p) for p in batch["prompt"]], params, use_tqdm=False)
        completions = [o.outputs[0].text for o in outputs]
        return {**batch, "completion": np.array(completions, dtype=object),
                "node": np.array([self.node] * len(completions), dtype=object)}

    def __del__(self):
        if hasattr(self, "llm"):  # the engine core's processes, and the GPU memory they hold
            self.llm.llm_engine.engine_core.shutdown()


FOLD_STAMP = "spd_fold.json"  # what a folded checkpoint was made from, written last


# max_calls=1: a fresh worker per call, so none stays holding memory (Ray makes a GPU task's
# worker single-use only when num_gpus is in the decorator, and .options cannot set max_calls);
# a pure function of its arguments: a lost worker or node reruns it elsewhere
@ray.remote(max_retries=3, max_calls=1)
def save_folded_checkpoint(model: ModelConfig, projection: Projection, out: str) -> str:
    """A Hugging Face folder of the model with the projection folded into k_proj/v_proj, folded
    on the CPU in the dtype the replicas will run (model.dtype on a GPU: auto = bfloat16)."""
    stamp = _fold_stamp(model, projection)
    tmp = Path(f"{out}.tmp-{os.getpid()}")
    _folded_on_cpu(model, projection, resolve_dtype(model.dtype, "cuda")).save_pretrained(tmp)
    load_tokenizer(model.path, model.trust_remote_code).save_pretrained(tmp)
    (tmp / FOLD_STAMP).write_text(json.dumps(stamp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _fold_stamp(model: ModelConfig, projection: Projection) -> dict:
    """What a folded checkpoint is made from: the model, its dtype, the subspace's content (a
    subspace remade in the same folder gives another stamp) and the mode."""
    bases = (Path(projection.subspace_dir) / "subspace.safetensors").read_bytes()
    return {"model": model.path, "dtype": model.dtype, "subspace": projection.subspace_dir,
            "subspace_sha256": hashlib.sha256(bases).hexdigest(), "mode": projection.mode,
            "beta": projection.beta}


def folded_checkpoint(model: ModelConfig, projection: Projection) -> str:
    """The folded checkpoint vLLM generates from, beside the subspace
    (`<subspace>.folded-<mode>`): made by a CPU task, or the one there already when it was made
    from the same model, subspace and mode (stage 2 and the inference-only evaluation share it)."""
    out = Path(f"{projection.subspace_dir}.folded-{projection.mode}" + (f"-beta{projection.beta:g}" if projection.beta else ""))
    try:
        if json.loads((out / FOLD_STAMP).read_text()) == _fold_stamp(model, projection):
            return str(out)
    except (OSError, ValueError):
        pass
    return ray.get(save_folded_checkpoint.remote(model, projection, str(out)))


def generate_dataset(ds: ray.data.Dataset, model: ModelConfig, gen: GenerationConfig, *,
                     context: int, projection: Projection | None = None, greedy: bool = False,
                     max_new_tokens: int | None = None) -> ray.data.Dataset:
    """`ds` (columns prompt, id, and seed unless greedy) with `completion` and `node` (the
    replica's Ray node) columns added, K/V projected as `projection` says (None: the plain
    model); rows take at most `context` tokens (`context_length`). Read it inside
    `pool_started`: a pool whose first replicas do not start in `gen.start_timeout_s` stops.

    With `gen.backend == "vllm"`, a projected run generates from the folded checkpoint
    (`folded_checkpoint`, beside the subspace), made here before any generation, in blocks of
    `gen.vllm_batch_size` prompts per engine call."""
    max_new_tokens = max_new_tokens or gen.max_new_tokens
    batch_size = gen.batch_size * gen.batches_per_call  # a call's rows, batch_size of them in flight
    if gen.backend == "vllm":
        checkpoint = model.path if projection is None else folded_checkpoint(model, projection)
        udf, kwargs = VLLMGenerator, dict(checkpoint=checkpoint, model=model, gen=gen,
                                          greedy=greedy, max_new_tokens=max_new_tokens, context=context)
        batch_size = gen.vllm_batch_size  # the engine schedules the block's rows itself
    else:
        if projection is not None and projection.apply == "fold":
            # folded once, by a CPU task, and loaded by every replica (a fold per replica holds
            # the whole model in host RAM while it folds: 8 x 15 GB for 7B on one node)
            dtype = resolve_dtype(model.dtype, "cuda" if gen.gpus_per_replica else model.device)
            model = dataclasses.replace(model, dtype=str(dtype).removeprefix("torch."))
            model, projection = dataclasses.replace(model, path=folded_checkpoint(model, projection)), None
        udf, kwargs = Generator, dict(model=model, gen=gen, projection=projection, greedy=greedy,
                                      max_new_tokens=max_new_tokens, context=context)
    out = ds.map_batches(
        udf,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=gen.replicas_min, max_size=gen.replicas_max),
        num_cpus=gen.cpus_per_replica,
        num_gpus=gen.gpus_per_replica,
        # Ray Data's own defaults restart a lost replica (or node's) and retry its batches
        # elsewhere without limit (ActorPoolMapOperator._apply_default_remote_args); a retried
        # batch samples the same texts where the backend is batch-invariant (see
        # VLLMGenerator), and in any case gives each row exactly one completion
    )
    # Ray Data's default (-1) waits forever for the pool's first replicas (a pool that can never
    # be placed hangs); with a wait, their start ends in an error instead
    out.context.wait_for_min_actors_s = gen.start_timeout_s
    return out


@contextmanager
def pool_started(gen: GenerationConfig) -> Iterator[None]:
    """Reading a `generate_dataset` pool: its replicas that did not start in time (resources the
    cluster lacks, or a model that loads for longer) are an error naming the settings."""
    try:
        yield
    except ray.exceptions.GetTimeoutError as err:
        if "starting actors" not in str(err):
            raise
        raise RuntimeError(
            f"the generation pool's first {gen.replicas_min} replicas ({gen.cpus_per_replica:g} CPUs, "
            f"{gen.gpus_per_replica:g} GPUs each) did not start in generation.start_timeout_s="
            f"{gen.start_timeout_s:g} s: the cluster has {ray.cluster_resources()}; lower "
            "generation.replicas_min / cpus_per_replica / gpus_per_replica, or raise "
            "generation.start_timeout_s while an autoscaler adds nodes or a large model loads") from None


# ---------------------------------------------------------------------------------------
# The stage's driver.


# a pure function of its arguments, on the resources of one generation replica
@ray.remote(max_retries=3, max_calls=1)
def _energy_outside(model: ModelConfig, subspace_dir: str, prompts: list[str], batch_size: int) -> dict:
    net = load_model(model.path, model.dtype, model.device, model.trust_remote_code)
    tok = load_tokenizer(model.path, model.trust_remote_code)
    ids = [tok(p)["input_ids"] for p in prompts]  # as generation tokenizes them
    batches = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i : i + batch_size]
        batches.append({"input_ids": right_pad(chunk, pad_id(tok)),
                        "attention_mask": right_pad([[1] * len(r) for r in chunk], 0)})
    energy = energy_outside(net, CapabilitySubspace.load(subspace_dir), batches)
    return {f"L{layer}.{kind}": v for (layer, kind), v in sorted(energy.items())}


def projection_bite(model: ModelConfig, gen: GenerationConfig, subspace_dir: str | Path,
                    prompts: list[str]) -> dict[str, float]:
    """The share of the K/V activations' energy on `prompts` that the projection onto the
    subspace in `subspace_dir` removes, by `L<layer>.<kind>` (`core.projection.energy_outside`),
    on one replica's resources."""
    task = _energy_outside.options(num_cpus=gen.cpus_per_replica, num_gpus=gen.gpus_per_replica)
    return ray.get(task.remote(model, str(subspace_dir), list(prompts), gen.batch_size))


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
        context = context_length(model, gen, prompts, gen.max_new_tokens)
        ds = generate_dataset(ray.data.from_items(todo), model, gen, context=context, projection=projection)
        with pool_started(gen), console.progress("generating", len(rows), done=len(done), unit="rows") as bar:
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
