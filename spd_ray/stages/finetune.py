"""Stage 3 on Ray: distillation fine-tuning (paper Eq. 14) with Ray Train + DeepSpeed.

`finetune_on_ray` runs a `TorchTrainer` whose workers each hold a DeepSpeed engine (ZeRO stage
`cfg.zero_stage`, ZeRO-3 by default) over the ORIGINAL weights, LoRA through peft or all weights
trainable. The recipe pieces (tokenized examples, masked padding, LoRA/full, AdamW with cosine
warm-up) are those of `spd_ray.core.recipe`; only the loop is distributed.

Data: every worker reads the whole corpus (`DataConfig(datasets_to_split=[])`), sorts it by id,
and each epoch takes its rows of one permutation drawn from `finetune.seed` and the epoch: rank r
gets positions r, r + n, ... of its first `n_rows // world_size * world_size` entries. So the
data order, and on CPU the whole training history, is a function of the seed and the world size
alone; every rank sees the same number of micro-batches (DeepSpeed's collectives hang when ranks
disagree). On GPUs results still vary in the last bits from run to run: cuBLAS and cuDNN pick
kernels and split reductions by timing, embedding backward and NCCL reductions sum in no fixed
order, so losses agree to a few decimals, not bit for bit. An epoch is
`steps_per_epoch = ceil(rows_per_rank / batch_size) // grad_accum` optimizer steps; the micro-batches
of a trailing incomplete accumulation group are read but not trained on.

Checkpoints: at the end of each epoch, and every `checkpoint_every_steps` optimizer steps or
`checkpoint_every_s` seconds (rank 0's clock, shared through the step's all-reduce), every rank
writes its DeepSpeed shards (`engine.save_checkpoint`, tag `ds`) and rank 0 adds `state.json`
(step, `wandb_run_id`, metrics history); `ray.train.report` merges them into one directory under
`storage_path/run_name`. A restarted worker group (`FailureConfig`, `max_failures`) or a second
call with the same `run_name`/`storage_path` resumes: the loop loads the latest checkpoint
(weights, optimizer, schedule) and continues at its exact step, skipping the micro-batches of
that epoch already trained (the data order being the seed's, they are the same ones).

Metrics: rank 0 keeps one entry per optimizer step (step, epoch, loss averaged over ranks, lr
used for the step, grad_norm, tokens = non-pad tokens summed over ranks, tokens_per_s) and
puts the whole history (carried over resumes) in the metrics of every checkpoint it reports.
The driver reads it from the final `Result.metrics`, writes `train_history.jsonl` and
`train_summary.json` into `output_dir`, and calls `on_metrics(entry)` per step AFTER training
(a callback cannot run inside the workers). Only rank 0 prints.

Export: every rank takes part in `engine._zero3_consolidated_16bit_state_dict()` (ZeRO-3;
otherwise the module's own state dict); rank 0 loads it into a plain (non-ZeRO) model built
from `model_path` with the same LoRA, then saves a merged HF model (`export=merged`) or the
peft adapter (`export=adapter`) into `output_dir`, with the tokenizer. `output_dir` must be on
storage that rank 0 and the driver share (it is on a single node, or with NFS).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from spd_ray.config import FinetuneConfig

CHECKPOINT_TAG = "ds"
STATE_FILE = "state.json"
HISTORY_FILE = "train_history.jsonl"
SUMMARY_FILE = "train_summary.json"


def _deep_update(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: FinetuneConfig, world_size: int, overrides: dict | None = None) -> dict:
    """A complete DeepSpeed config (numbers only, no "auto") for `deepspeed.initialize`.

    bf16 on GPU, fp32 on CPU. `overrides` is merged in recursively, e.g.
    `{"zero_optimization": {"stage3_param_persistence_threshold": 0}}` so that a tiny model is
    really partitioned (tests)."""
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"finetune.zero_stage={cfg.zero_stage}; valid values: 0, 1, 2, 3")
    if cfg.offload_params and cfg.zero_stage != 3:
        raise ValueError("finetune.offload_params needs finetune.zero_stage=3")
    if cfg.offload_optimizer and cfg.zero_stage == 0:
        raise ValueError("finetune.offload_optimizer needs finetune.zero_stage >= 1")
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        zero["contiguous_gradients"] = True
        zero["overlap_comm"] = False
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(cfg.use_gpu)}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": bool(cfg.use_gpu)}
    ds = {
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(cfg.use_gpu)},
        "fp16": {"enabled": False},
        # the optimizer is the recipe's torch AdamW (optimizer_and_schedule), not a DS one
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _deep_update(ds, overrides or {})


def epoch_plan(n_rows: int, world_size: int, cfg: FinetuneConfig) -> dict:
    """Rows and micro-batches per rank per epoch, optimizer steps per epoch and in total."""
    rows_per_rank = n_rows // world_size  # an equal share per rank: the remainder sits the epoch out
    micro_per_epoch = math.ceil(rows_per_rank / cfg.batch_size)
    steps_per_epoch = micro_per_epoch // cfg.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"{n_rows} training rows over {world_size} workers give {rows_per_rank} rows per worker: "
            f"fewer than one optimizer step of batch_size {cfg.batch_size} x grad_accum "
            f"{cfg.grad_accum}; lower finetune.num_workers, batch_size or grad_accum")
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return {"rows_per_rank": rows_per_rank, "micro_per_epoch": micro_per_epoch,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
            "n_epochs": math.ceil(total_steps / steps_per_epoch)}


# ---------------------------------------------------------------------------------------
# The loop that runs on every Ray Train worker.


def _consolidated_state_dict(engine, zero_stage: int) -> dict | None:
    """The full state dict on rank 0 (None elsewhere). Every rank must call it under ZeRO-3."""
    import torch.distributed as dist

    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}


def zero3_partition_counts(model) -> dict:
    """How ZeRO-3 holds the parameters on this rank. Partitioned: the local shard `ds_tensor` is
    smaller than the full tensor. Persistent (numel below stage3_param_persistence_threshold):
    kept whole after the first forward. Released: no whole copy held right now."""
    params = list(model.parameters())
    zero = [p for p in params if hasattr(p, "ds_tensor")]
    return {"params": len(params), "zero3_params": len(zero),
            "zero3_partitioned": sum(p.ds_tensor.numel() < p.ds_numel for p in zero),
            "zero3_persistent": sum(bool(getattr(p, "ds_persist", False)) for p in zero),
            "zero3_released": sum(p.data.numel() == 0 for p in zero),
            "local_numel": int(sum(p.ds_tensor.numel() for p in zero)),
            "full_numel": int(sum(p.ds_numel for p in zero))}


def _export(cfg: FinetuneConfig, model_path: str, state_dict: dict, output_dir: Path, dtype) -> None:
    """Rank 0: the consolidated weights into a plain model, saved as HF model or peft adapter."""
    from transformers import AutoModelForCausalLM

    from spd_ray.core.modeling import load_tokenizer
    from spd_ray.core.recipe import finished_model, prepare_model

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model = prepare_model(model, cfg)
    expected = model.state_dict()
    bad = [k for k, v in state_dict.items()
           if k in expected and v.numel() != expected[k].numel()]
    if bad:  # the classic ZeRO-3 export bug: partitioned (size-0) tensors saved as weights
        raise RuntimeError(f"consolidated weights have wrong sizes (partitioned?): {bad[:5]}")
    model.load_state_dict(state_dict, strict=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.method == "lora" and cfg.export == "adapter":
        model.save_pretrained(str(output_dir))  # adapter_config.json + adapter weights
    else:
        finished_model(model).save_pretrained(str(output_dir))
    load_tokenizer(model_path).save_pretrained(str(output_dir))


def _row_order(row: dict) -> tuple:
    """The corpus's canonical order: by id (stage 2's rows), else by text."""
    return (str(row.get("id", "")), str(row["prompt"]), str(row["completion"]))


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: DeepSpeed engine, epochs with checkpoints, then the export."""
    use_gpu = bool(config["finetune"]["use_gpu"])
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported

    import deepspeed
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from spd_ray.core.modeling import load_tokenizer
    from spd_ray.core.recipe import build_examples, collate, optimizer_and_schedule, prepare_model

    cfg = FinetuneConfig(**config["finetune"])
    model_path, output_dir = config["model_path"], Path(config["output_dir"])
    debug_dir = Path(config["debug_dir"]) if config.get("debug_dir") else None
    stop_after = config.get("stop_after_epochs")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    plan = epoch_plan(int(config["n_rows"]), world, cfg)
    spe, total_steps = plan["steps_per_epoch"], plan["total_steps"]

    def say(msg: str) -> None:
        if rank == 0:
            print(f"[finetune] {msg}", flush=True)

    def debug_save(name: str, sd: dict | None) -> None:
        if debug_dir is not None and rank == 0:
            debug_dir.mkdir(parents=True, exist_ok=True)
            torch.save(sd, debug_dir / f"{name}.pt")

    # wrap the process group Ray Train made (gloo / NCCL): DeepSpeed's config reads the world
    # size from deepspeed.comm, which is 1 until this runs (batch-size assertion otherwise)
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    ds_cfg = deepspeed_config(cfg, world, config.get("ds_overrides"))
    dtype = torch.bfloat16 if use_gpu else torch.float32
    torch.manual_seed(cfg.seed)
    # under ZeRO-3 this must exist (and stay referenced) before from_pretrained: the weights
    # are then created partitioned (deepspeed.zero.Init) instead of whole on every rank
    hf_ds = HfDeepSpeedConfig(ds_cfg) if cfg.zero_stage == 3 else None
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        # non-reentrant: works with frozen inputs (LoRA) and ZeRO-3's parameter hooks;
        # transformers 5.x renamed gradient_checkpointing_enable (kept as a deprecated alias)
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model = prepare_model(model, cfg)
    opt, sched = optimizer_and_schedule(model, cfg, total_steps, spe)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=ds_cfg)
    say(f"ZeRO-{cfg.zero_stage} on {world} workers: {zero3_partition_counts(engine.module)}; "
        f"plan {plan}")

    tokenizer = load_tokenizer(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    nodes: list = [None] * world  # where the workers run, for the run's record
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())

    start_epoch, start_step, step, history = 0, 0, 0, []
    wandb_run_id = config.get("wandb_run_id")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            load_path, _ = engine.load_checkpoint(d, tag=CHECKPOINT_TAG)
            if load_path is None:
                raise RuntimeError(f"no DeepSpeed checkpoint (tag {CHECKPOINT_TAG!r}) in {d}")
            state = json.loads((Path(d) / STATE_FILE).read_text())
        step, history = state["step"], state["history"]
        start_step = step
        start_epoch = step // spe  # a mid-epoch checkpoint resumes inside its epoch
        wandb_run_id = wandb_run_id or state.get("wandb_run_id")
        say(f"resumed at step {step} (epoch {start_epoch}, {step - start_epoch * spe} of its steps done)")
        if debug_dir is not None:
            debug_save("resumed", _consolidated_state_dict(engine, cfg.zero_stage))

    # Every worker reads the whole corpus and takes its rows of a permutation drawn from the seed
    # and the epoch: the data order is a function of finetune.seed and the world size alone
    # (Ray Data's streaming split hands blocks to workers as they come, in no fixed order).
    rows = sorted(ray.train.get_dataset_shard("train").iter_rows(), key=_row_order)

    def epoch_rows(epoch: int) -> list[dict]:
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        return [rows[i] for i in order[: plan["rows_per_rank"] * world][rank::world].tolist()]

    def save(epoch: int, name: str) -> None:
        """A checkpoint of every rank's shards and rank 0's state, registered with Ray Train."""
        nonlocal last_save
        finished = step >= total_steps
        losses = [h["loss"] for h in history if h["epoch"] == epoch]
        metrics = {"epoch": epoch + 1, "epochs_total": plan["n_epochs"], "step": step,
                   "total_steps": total_steps, "finished": finished, "start_epoch": start_epoch,
                   "start_step": start_step,
                   "steps_per_epoch": spe, "world_size": world, "wandb_run_id": wandb_run_id,
                   "epoch_loss": sum(losses) / len(losses) if losses else float("nan"),
                   "nodes": sorted(set(nodes)),
                   **zero3_partition_counts(engine.module), "history": history}
        with tempfile.TemporaryDirectory(prefix="spd_ckpt_") as tmp:
            engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG, client_state={"step": step})
            if rank == 0:
                (Path(tmp) / STATE_FILE).write_text(json.dumps(
                    {"step": step, "wandb_run_id": wandb_run_id, "history": history}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=name)
        last_save = time.monotonic()
        say(f"{name}: step {step}/{total_steps} loss {metrics['epoch_loss']:.4f}")

    engine.train()
    group = plan["micro_per_epoch"] - plan["micro_per_epoch"] % cfg.grad_accum  # trained micro-batches
    stopped, last_save = False, time.monotonic()
    for epoch in range(start_epoch, plan["n_epochs"]):
        n_micro, acc, t0 = 0, torch.zeros(4, dtype=torch.float64), time.perf_counter()
        mine = epoch_rows(epoch)
        done_here = (step - epoch * spe) * cfg.grad_accum  # micro-batches already trained (resume)
        for start in range(0, len(mine), cfg.batch_size):
            n_micro += 1
            if n_micro <= done_here or n_micro > group or step >= total_steps:
                continue  # trained before the resume, or the tail that fills no optimizer step
            batch = mine[start : start + cfg.batch_size]
            examples = build_examples(tokenizer, [str(r["prompt"]) for r in batch],
                                      [str(r["completion"]) for r in batch],
                                      max_length=cfg.max_length, loss_on=cfg.loss_on)
            inputs = {k: v.to(engine.device) for k, v in collate(examples, pad_id).items()}
            loss = engine(**inputs).loss
            engine.backward(loss)
            lr = engine.get_lr()[0]
            engine.step()
            acc += torch.tensor([loss.item(), 1.0, float(inputs["attention_mask"].sum()), 0.0],
                                dtype=torch.float64)
            if n_micro % cfg.grad_accum == 0:  # an optimizer step just happened
                step += 1
                # rank 0's clock decides a timed checkpoint; the all-reduce tells every rank
                acc[3] = float(rank == 0 and 0 < cfg.checkpoint_every_s < time.monotonic() - last_save)
                summed = acc.to(engine.device)  # NCCL reduces CUDA tensors only
                dist.all_reduce(summed)
                acc.copy_(summed.cpu())
                elapsed = time.perf_counter() - t0
                grad_norm = engine.get_global_grad_norm()
                if rank == 0:
                    history.append({
                        "step": step, "total_steps": total_steps, "epoch": epoch,
                        "loss": float(acc[0] / acc[1]), "lr": float(lr),
                        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                        "tokens": int(acc[2]), "tokens_per_s": float(acc[2]) / max(elapsed, 1e-9)})
                due = acc[3] > 0 or (cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0)
                acc.zero_()
                if due and step < min(total_steps, (epoch + 1) * spe):  # the epoch's end saves anyway
                    save(epoch, f"step_{step:07d}")
                t0 = time.perf_counter()
        if n_micro != plan["micro_per_epoch"]:  # the plan and the split disagree: a bug
            raise RuntimeError(f"rank {rank} read {n_micro} micro-batches in epoch {epoch}, "
                               f"expected {plan['micro_per_epoch']}")

        save(epoch, f"step_{step:07d}")
        epochs_done, done = epoch + 1, step >= total_steps
        if stop_after is not None and epochs_done - start_epoch >= stop_after and not done:
            stopped = True  # test-only: leave as if the job had been interrupted here
            break

    if stopped:
        if debug_dir is not None:
            debug_save("stopped", _consolidated_state_dict(engine, cfg.zero_stage))
        return
    state_dict = _consolidated_state_dict(engine, cfg.zero_stage)  # a collective under ZeRO-3
    if rank == 0:
        debug_save("final", state_dict)
        del engine, model, opt
        unset_hf_deepspeed_config()  # the export model is a plain one, not zero.Init-partitioned
        hf_ds = None
        _export(cfg, model_path, state_dict, output_dir, dtype)
        say(f"exported ({cfg.method}, {cfg.export}) to {output_dir}")
    del hf_ds


# ---------------------------------------------------------------------------------------
# The driver.


def _storage_uri(storage_path: str) -> str:
    return storage_path if "://" in storage_path else str(Path(storage_path).expanduser().resolve())


def finetune_on_ray(cfg: FinetuneConfig, model_path: str, dataset, output_dir: Path | str,
                    run_name: str, storage_path: str, on_metrics=None, *,
                    wandb_run_id: str | None = None, ds_overrides: dict | None = None,
                    extra_loop_config: dict | None = None) -> str:
    """Fine-tune `model_path` on the `prompt`/`completion` rows of `dataset` with Ray Train +
    DeepSpeed; returns `output_dir`, a folder that loads with `from_pretrained` (export=merged)
    or `PeftModel.from_pretrained(base, output_dir)` (LoRA, export=adapter).

    Same `run_name` + `storage_path` as an interrupted call: resumes from its last epoch.
    `on_metrics(entry)` is called on the driver for every optimizer step after training.
    `ds_overrides` is merged into the DeepSpeed config; `extra_loop_config` adds test-only
    knobs to the loop (`stop_after_epochs`, `debug_dir`).

    The driver materializes the corpus once in the object store (text: megabytes even for the
    paper's largest runs): it counts the rows for the schedule, and each worker, which reads the
    whole corpus, takes blocks from there instead of running the read and filter again."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from spd_ray.core.modeling import load_tokenizer

    load_tokenizer(model_path)  # fails fast (and clearly) on a wrong path
    if Path(model_path).expanduser().is_dir():
        model_path = str(Path(model_path).expanduser().resolve())
    missing = {"prompt", "completion"} - set(dataset.columns())
    if missing:
        raise ValueError(f"the fine-tuning dataset lacks columns {sorted(missing)}; "
                         f"it has {dataset.columns()}")
    dataset = dataset.select_columns(["id", "prompt", "completion"] if "id" in dataset.columns()
                                     else ["prompt", "completion"]).materialize()
    n_rows = dataset.count()
    plan = epoch_plan(n_rows, cfg.num_workers, cfg)  # errors here, not in the workers
    output_dir = Path(output_dir).expanduser().resolve()
    loop_config = {"finetune": dataclasses.asdict(cfg), "model_path": model_path,
                   "output_dir": str(output_dir), "n_rows": n_rows, "ds_overrides": ds_overrides,
                   "wandb_run_id": wandb_run_id, **(extra_loop_config or {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker},
                                     placement_strategy=cfg.placement),
        run_config=RunConfig(name=run_name, storage_path=_storage_uri(storage_path),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep),
                             failure_config=FailureConfig(max_failures=cfg.max_failures,
                                                          max_preemption_failures=-1)),
        datasets={"train": dataset},
        dataset_config=DataConfig(datasets_to_split=[]),  # every worker reads it all (the loop splits)
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    history = metrics.pop("history", [])
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / HISTORY_FILE).write_text("".join(json.dumps(h) + "\n" for h in history))
    summary = {**metrics, "n_rows": n_rows, "plan": plan,
               "checkpoint": result.checkpoint.path if result.checkpoint else None}
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    if on_metrics is not None:
        for entry in history:
            on_metrics(entry)
    return str(output_dir)
