"""Stage 2 on Ray Data: an actor pool of model replicas generates completions.

Each actor loads one replica in `__init__`, with the projection folded into a copy of the
weights (default) or applied by hooks; rows carry their own sampling seed, so the samples do
not depend on how many replicas there are or which one a row lands on. Evaluation
(`spd_ray.stages.evaluate`) uses the same actors with greedy decoding and no projection.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np
import ray

from spd_ray.config import GenerationConfig, ModelConfig, SubspaceConfig
from spd_ray.core.generation import generate
from spd_ray.core.modeling import load_model, load_tokenizer
from spd_ray.core.projection import fold_projection, projection_hooks
from spd_ray.core.subspace import CapabilitySubspace


def load_projected(model: ModelConfig, subspace_dir: str | None, mode: str,
                   hooks: ExitStack | None = None):
    """The model (eval mode) with K/V projected onto the subspace saved in `subspace_dir` (None:
    the plain model): folded into a copy of the weights, or, given `hooks`, by forward hooks that
    stay on until `hooks` is closed."""
    net = load_model(model.path, model.dtype, model.device, model.trust_remote_code)
    if subspace_dir is None:
        return net
    subspace = CapabilitySubspace.load(subspace_dir)
    if hooks is None:
        return fold_projection(net, subspace, mode)
    hooks.enter_context(projection_hooks(net, subspace, mode))
    return net


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
def save_folded_checkpoint(model: ModelConfig, subspace_dir: str, mode: str, out: str) -> str:
    """A Hugging Face folder of the model with the projection folded into k_proj/v_proj."""
    load_projected(model, subspace_dir, mode).save_pretrained(out)
    load_tokenizer(model.path, model.trust_remote_code).save_pretrained(out)
    return out


def generate_dataset(ds: ray.data.Dataset, model: ModelConfig, gen: GenerationConfig, *,
                     subspace_dir: str | Path | None = None, mode: str = SubspaceConfig.mode,
                     apply: str = SubspaceConfig.apply, greedy: bool = False,
                     max_new_tokens: int | None = None,
                     folded_checkpoint: str | Path | None = None) -> ray.data.Dataset:
    """`ds` (columns prompt, id, and seed unless greedy) with `completion` and `node` (the
    replica's Ray node) columns added.

    With `gen.backend == "vllm"`, a projected run generates from `folded_checkpoint` (written by
    `save_folded_checkpoint`); `subspace_dir` None means the plain model."""
    max_new_tokens = max_new_tokens or gen.max_new_tokens
    if gen.backend == "vllm":
        if subspace_dir is not None and folded_checkpoint is None:
            raise ValueError("the vLLM backend projects through a folded checkpoint: pass "
                             "folded_checkpoint (see save_folded_checkpoint)")
        checkpoint = model.path if subspace_dir is None else str(folded_checkpoint)
        udf, kwargs = VLLMGenerator, dict(checkpoint=checkpoint, model=model, gen=gen,
                                          greedy=greedy, max_new_tokens=max_new_tokens)
    else:
        udf, kwargs = Generator, dict(
            model=model, gen=gen, subspace_dir=None if subspace_dir is None else str(subspace_dir),
            mode=mode, apply=apply, greedy=greedy, max_new_tokens=max_new_tokens)
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
