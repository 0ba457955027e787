"""Stage 2 on Ray Data: an actor pool of model replicas generates completions.

Each actor loads one replica in `__init__`, with the projection folded into the weights on the
CPU (default) or applied by hooks; rows carry their own sampling seed, so the samples do
not depend on how many replicas there are or which one a row lands on. Evaluation
(`spd_ray.stages.evaluate`) uses the same actors with greedy decoding and no projection.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import ray
import torch

from spd_ray.config import GenerationConfig, ModelConfig, SubspaceConfig
from spd_ray.core.generation import generate
from spd_ray.core.modeling import (
    from_pretrained,
    load_model,
    load_tokenizer,
    resolve_dtype,
    torch_device,
)
from spd_ray.core.projection import fold_projection, projection_hooks
from spd_ray.core.subspace import CapabilitySubspace


def _folded_on_cpu(model: ModelConfig, subspace_dir: str, mode: str, dtype: torch.dtype):
    """The model on the CPU with the projection folded into its own weights (one copy of them)."""
    net = from_pretrained(model.path, dtype, model.trust_remote_code).eval()
    return fold_projection(net, CapabilitySubspace.load(subspace_dir), mode, inplace=True)


def load_projected(model: ModelConfig, subspace_dir: str | None, mode: str,
                   hooks: ExitStack | None = None):
    """The model (eval mode, on `model.device`) with K/V projected onto the subspace saved in
    `subspace_dir` (None: the plain model): folded into the weights, or, given `hooks`, by
    forward hooks that stay on until `hooks` is closed. The fold is done on the CPU before the
    model moves to its device, so a GPU never holds two copies (a 7B/8B model on 24 GB)."""
    if subspace_dir is None or hooks is not None:
        net = load_model(model.path, model.dtype, model.device, model.trust_remote_code)
        if subspace_dir is not None:
            hooks.enter_context(projection_hooks(net, CapabilitySubspace.load(subspace_dir), mode))
        return net
    dtype = resolve_dtype(model.dtype, model.device)
    return _folded_on_cpu(model, subspace_dir, mode, dtype).to(torch_device(model.device))


class Generator:
    """A Ray Data callable class: one model replica per actor."""

    def __init__(self, model: ModelConfig, gen: GenerationConfig, subspace_dir: str | None,
                 mode: str, apply: str, greedy: bool, max_new_tokens: int):
        self._hooks = ExitStack()  # apply=hooks: the projection hooks, on for the actor's lifetime
        self.model = load_projected(model, subspace_dir, mode, None if apply == "fold" else self._hooks)
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


# vLLM 0.29 has batch-invariant kernels for CUDA compute capability 8.x (Triton matmuls) and
# 9.0+ (cuBLAS without split-k): vllm/model_executor/determinism/batch_invariant.py
BATCH_INVARIANT_CAPABILITY = 80


def _batch_invariance() -> None:
    """VLLM_BATCH_INVARIANT=1 (unless the user set it) where this GPU has the kernels, before
    vLLM reads it. NVML answers, so CUDA is not initialized before vLLM starts."""
    from vllm.platforms import current_platform

    if current_platform.has_device_capability(BATCH_INVARIANT_CAPABILITY):
        os.environ.setdefault("VLLM_BATCH_INVARIANT", "1")


class VLLMGenerator:
    """The vLLM backend (GPU clusters): generates from a saved checkpoint that already has the
    projection folded in (`folded_checkpoint`), so vLLM needs no hooks.

    What holds for a row's sample: its `seed` keys vLLM's noise (v1/worker/gpu/sample/gumbel.py
    draws from the request's seed and position), but its logits depend on the other requests of
    the engine's batch unless vLLM runs batch-invariant (`_batch_invariance`: GPUs of compute
    capability 8.0 and newer). Elsewhere a retried block may sample other texts for the same
    seeds: still one per row, which is all stage 2's resume relies on (rows written are kept, the
    others generated). The HF backend is batch-invariant on CPU (tests/test_generation.py); on
    GPU its kernels may change the last bits of the logits with a batch's padding (untested)."""

    def __init__(self, checkpoint: str, model: ModelConfig, gen: GenerationConfig, greedy: bool,
                 max_new_tokens: int):
        try:
            _batch_invariance()
            from vllm import LLM, SamplingParams
        except ImportError as err:
            raise ImportError("generation.backend=vllm needs vLLM on the generation nodes "
                              "(pip install 'spd-ray[vllm]'); or use generation.backend=hf") from err
        self.llm = LLM(model=checkpoint, dtype=model.dtype, trust_remote_code=model.trust_remote_code,
                       max_model_len=gen.vllm_max_model_len(max_new_tokens),
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


FOLD_STAMP = "spd_fold.json"  # what a folded checkpoint was made from, written last


# max_calls=1: a fresh worker per call, so none stays holding memory (Ray makes a GPU task's
# worker single-use only when num_gpus is in the decorator, and .options cannot set max_calls);
# a pure function of its arguments: a lost worker or node reruns it elsewhere
@ray.remote(max_retries=3, max_calls=1)
def save_folded_checkpoint(model: ModelConfig, subspace_dir: str, mode: str, out: str) -> str:
    """A Hugging Face folder of the model with the projection folded into k_proj/v_proj, folded
    on the CPU in the dtype vLLM will run (model.dtype on a GPU: auto = bfloat16)."""
    stamp = _fold_stamp(model, subspace_dir, mode)
    tmp = Path(f"{out}.tmp-{os.getpid()}")
    _folded_on_cpu(model, subspace_dir, mode, resolve_dtype(model.dtype, "cuda")).save_pretrained(tmp)
    load_tokenizer(model.path, model.trust_remote_code).save_pretrained(tmp)
    (tmp / FOLD_STAMP).write_text(json.dumps(stamp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _fold_stamp(model: ModelConfig, subspace_dir: str, mode: str) -> dict:
    return {"model": model.path, "dtype": model.dtype, "subspace": str(subspace_dir), "mode": mode}


def folded_checkpoint(model: ModelConfig, subspace_dir: str | Path, mode: str,
                      out: str | Path | None = None) -> str:
    """The folded checkpoint vLLM generates from, in `out` (default: beside the subspace,
    `<subspace>.folded-<mode>`): made by a CPU task, or the one there already when it was made
    from the same model, subspace and mode (stage 2 and the inference-only evaluation share it)."""
    out = Path(out or f"{subspace_dir}.folded-{mode}")
    try:
        if json.loads((out / FOLD_STAMP).read_text()) == _fold_stamp(model, str(subspace_dir), mode):
            return str(out)
    except (OSError, ValueError):
        pass
    return ray.get(save_folded_checkpoint.remote(model, str(subspace_dir), mode, str(out)))


def generate_dataset(ds: ray.data.Dataset, model: ModelConfig, gen: GenerationConfig, *,
                     subspace_dir: str | Path | None = None, mode: str = SubspaceConfig.mode,
                     apply: str = SubspaceConfig.apply, greedy: bool = False,
                     max_new_tokens: int | None = None,
                     folded_dir: str | Path | None = None) -> ray.data.Dataset:
    """`ds` (columns prompt, id, and seed unless greedy) with `completion` and `node` (the
    replica's Ray node) columns added; `subspace_dir` None means the plain model.

    With `gen.backend == "vllm"`, a projected run generates from the folded checkpoint
    (`folded_checkpoint`, in `folded_dir` or beside the subspace), made here before any
    generation, in blocks of `gen.vllm_batch_size` prompts per engine call."""
    max_new_tokens = max_new_tokens or gen.max_new_tokens
    batch_size = gen.batch_size
    if gen.backend == "vllm":
        checkpoint = (model.path if subspace_dir is None
                      else folded_checkpoint(model, subspace_dir, mode, folded_dir))
        udf, kwargs = VLLMGenerator, dict(checkpoint=checkpoint, model=model, gen=gen,
                                          greedy=greedy, max_new_tokens=max_new_tokens)
        batch_size = gen.vllm_batch_size  # the engine schedules the block's rows itself
    else:
        udf, kwargs = Generator, dict(
            model=model, gen=gen, subspace_dir=None if subspace_dir is None else str(subspace_dir),
            mode=mode, apply=apply, greedy=greedy, max_new_tokens=max_new_tokens)
    return ds.map_batches(
        udf,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=gen.replicas_min, max_size=gen.replicas_max),
        num_cpus=gen.cpus_per_replica,
        num_gpus=gen.gpus_per_replica,
        # a lost replica (or node) is restarted and its batches retried elsewhere, without limit;
        # a retried batch samples the same texts where the backend is batch-invariant (see
        # VLLMGenerator), and in any case gives each row exactly one completion
        max_restarts=-1,
        max_task_retries=-1,
    )
