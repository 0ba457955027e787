"""Every DeepSpeed call of spd-ray, in one place (after OpenRLHF's DeepSpeed strategy).

Stage 1 (`calibration.zero_stage=3`) and stage 3 share it:

- `resolve_precision`: the one dtype rule. `model.dtype` is resolved once, on the driver, for
  the devices the stage's workers have: auto = bfloat16 on GPU, float32 on CPU; an explicit
  dtype is used as given. The DeepSpeed config's `bf16` / `fp16` flags follow from it, and the
  strategy reads the model's dtype back from those flags (zero.Init casts to them).
- `deepspeed_config`: a complete config (numbers only, no "auto") from the parameters a stage
  has, with the user's overrides merged in.
- `DeepSpeedStrategy`: one rank's DeepSpeed. `setup_distributed` (DS_ACCELERATOR, then
  `deepspeed.init_distributed`), `load_model` (ZeRO-3: partitioned as it loads), `prepare`
  (the engine: without an optimizer for calibration, whose forward and backward gather each
  module's parameters; with the recipe's AdamW and schedule for training), `train_micro_batch`,
  `save_checkpoint` / `load_checkpoint` (Ray Train checkpoint directories), the gathered state
  dict for the export, and how ZeRO-3 partitions the parameters on this rank.

`deepspeed` is imported only inside the strategy's methods, after `setup_distributed` has set
DS_ACCELERATOR: the driver never imports it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from spd_ray.config import deep_merge
from spd_ray.core.modeling import from_pretrained, resolve_dtype

CHECKPOINT_TAG = "ds"
STATE_FILE = "state.json"


def resolve_precision(dtype: str, gpu: bool) -> torch.dtype:
    """The dtype a stage runs in: `model.dtype` on the stage's devices (auto = bfloat16 on GPU,
    float32 on CPU)."""
    return resolve_dtype(dtype, "cuda" if gpu else "cpu")


def config_dtype(config: dict) -> torch.dtype:
    """The model dtype a DeepSpeed config's precision flags stand for."""
    if config["bf16"]["enabled"]:
        return torch.bfloat16
    return torch.float16 if config["fp16"]["enabled"] else torch.float32


def deepspeed_config(*, zero_stage: int, world_size: int, micro_batch_size: int,
                     dtype: torch.dtype, grad_accum: int = 1, max_grad_norm: float = 0.0,
                     offload_optimizer: bool = False, offload_params: bool = False,
                     pin_memory: bool = False, overrides: dict | None = None) -> dict:
    """A complete DeepSpeed config for `deepspeed.initialize`. Without an optimizer (calibration)
    the batch, accumulation and clipping fields are inert. `overrides` is merged in recursively,
    e.g. `{"zero_optimization": {"stage3_param_persistence_threshold": 0}}` so that a tiny model
    is really partitioned (tests)."""
    # overlap_comm is left to DeepSpeed's default (on for ZeRO-3, runtime/zero/config.py); on
    # CPU it is inert (a synchronized device: ZeRO-3 makes no side stream)
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage >= 1:
        zero["contiguous_gradients"] = True
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    ds = {
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        # the optimizer is the recipe's torch AdamW (optimizer_and_schedule), not a DS one
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return deep_merge(ds, overrides or {})


class DeepSpeedStrategy:
    """One rank's DeepSpeed: process group, engine, checkpoints, export. Build it from a config
    of `deepspeed_config` (made on the driver, so every rank has the same one); `gpu` says
    whether this rank has a GPU (NCCL, pinned memory) or runs on CPU (gloo)."""

    def __init__(self, config: dict, gpu: bool):
        self.config, self.gpu = config, gpu
        self.zero_stage = config["zero_optimization"]["stage"]
        self.dtype = config_dtype(config)
        self.engine = None
        self._hf_ds = None  # ZeRO-3: transformers holds it weakly; it must outlive the model

    # -- process group and engine ------------------------------------------------------

    def setup_distributed(self) -> None:
        """DeepSpeed over this rank's process group: the one Ray Train made (its backend), or
        one from the launcher's environment (MASTER_ADDR, RANK, ...; gloo on CPU, NCCL on GPU).
        DeepSpeed reads the world size from deepspeed.comm, which is 1 until this runs."""
        if not self.gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported
        import deepspeed
        import torch.distributed as dist

        backend = dist.get_backend() if dist.is_initialized() else ("nccl" if self.gpu else "gloo")
        deepspeed.init_distributed(dist_backend=backend)

    @property
    def rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank()

    def load_model(self, path: str, trust_remote_code: bool = False):
        """The causal LM in the config's dtype. ZeRO-3: every rank calls this at once and the
        weights are created partitioned (deepspeed.zero.Init) instead of whole on every rank."""
        if self.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds = HfDeepSpeedConfig(self.config)  # before from_pretrained
        return from_pretrained(path, self.dtype, trust_remote_code)

    def prepare(self, model, optimizer=None, scheduler=None):
        """The engine around `model`. Without an optimizer (calibration) ZeRO-3 gathers each
        module's parameters for its forward and backward; with one (training) the engine owns
        the optimizer and schedule and is put in train mode."""
        import deepspeed

        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               lr_scheduler=scheduler, config=self.config)
        if optimizer is not None:
            self.engine.train()
        return self.engine

    def close(self) -> None:
        """Drop the engine and the ZeRO-3 config: a model loaded after this is a plain one."""
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        self.engine = None
        unset_hf_deepspeed_config()
        self._hf_ds = None

    # -- training ------------------------------------------------------------------------

    def train_micro_batch(self, inputs: dict) -> tuple[torch.Tensor, float]:
        """Forward, backward and DeepSpeed's step (an optimizer step at the end of each
        accumulation group); returns the loss and the learning rate of that step."""
        inputs = {k: v.to(self.engine.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        loss = self.engine(**inputs).loss
        self.engine.backward(loss)
        lr = self.engine.get_lr()[0]
        self.engine.step()
        return loss, lr

    def grad_norm(self) -> float:
        """The gradient norm of the last optimizer step (before clipping); nan if unknown."""
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        """`values` (CPU) summed over the ranks, on CPU (NCCL reduces CUDA tensors only)."""
        import torch.distributed as dist

        summed = values.to(self.engine.device)
        dist.all_reduce(summed)
        return summed.cpu()

    def all_gather_object(self, obj) -> list:
        """`obj` of every rank, in rank order."""
        import torch.distributed as dist

        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    # -- checkpoints and export ----------------------------------------------------------

    def save_checkpoint(self, name: str, state: dict, metrics: dict) -> None:
        """One Ray Train checkpoint `name`: every rank's shards (weights, optimizer, schedule)
        and rank 0's `state` (JSON), reported with `metrics`; Ray Train merges the ranks'
        directories into one under the run's storage path."""
        import ray.train

        with tempfile.TemporaryDirectory(prefix="spd_ckpt_") as tmp:
            self.engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG, client_state={"step": state["step"]})
            if self.rank == 0:
                (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=name)

    def load_checkpoint(self) -> dict | None:
        """Ray Train's latest checkpoint of this run loaded into the engine (weights, optimizer,
        schedule); returns the state saved with it, or None when there is none."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            load_path, _ = self.engine.load_checkpoint(d, tag=CHECKPOINT_TAG)
            if load_path is None:
                raise RuntimeError(f"no DeepSpeed checkpoint (tag {CHECKPOINT_TAG!r}) in {d}")
            return json.loads((Path(d) / STATE_FILE).read_text())

    def consolidated_state_dict(self) -> dict | None:
        """The full state dict on rank 0 (None elsewhere). Every rank must call it under ZeRO-3:
        it gathers the partitions."""
        if self.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        if self.rank != 0:
            return None
        return {k: v.detach().cpu().clone() for k, v in self.engine.module.state_dict().items()}

    def partition_counts(self) -> dict:
        """How ZeRO-3 holds the parameters on this rank. Partitioned: the local shard
        `ds_tensor` is smaller than the full tensor. Persistent (numel below
        stage3_param_persistence_threshold): kept whole after the first forward. Released: no
        whole copy held right now."""
        params = list(self.engine.module.parameters())
        zero = [p for p in params if hasattr(p, "ds_tensor")]
        return {"params": len(params), "zero3_params": len(zero),
                "zero3_partitioned": sum(p.ds_tensor.numel() < p.ds_numel for p in zero),
                "zero3_persistent": sum(bool(getattr(p, "ds_persist", False)) for p in zero),
                "zero3_released": sum(p.data.numel() == 0 for p in zero),
                "local_numel": int(sum(p.ds_tensor.numel() for p in zero)),
                "full_numel": int(sum(p.ds_numel for p in zero))}
