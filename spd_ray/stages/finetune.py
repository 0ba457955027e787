"""Stage 3 on Ray: distillation fine-tuning (paper Eq. 14) with Ray Train + DeepSpeed.

`finetune_on_ray` runs a `TorchTrainer` whose workers each hold a DeepSpeed engine (ZeRO stage
`cfg.zero_stage`, ZeRO-3 by default) over the ORIGINAL weights, LoRA through peft or all weights
trainable. The recipe pieces (tokenized examples, packed or padded batches, LoRA/full, AdamW with cosine
warm-up) are those of `spd_ray.core.recipe`; only the loop is distributed. Every DeepSpeed call
(config, process group, engine, checkpoints, gathered weights) is `spd_ray.stages.deepspeed`'s;
the precision is `model.dtype` (auto: bf16 on GPU, fp32 on CPU), as in stage 1. The worker's
loop is `FinetuneRecipe`: set up, resume, per epoch its data order, training and checkpoint,
then the export.

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
`train_summary.json` into `output_dir`, and returns it (`FinetuneResult.history`: the pipeline
sends it to W&B). Only rank 0 prints.

Export: every rank takes part in gathering the weights (`consolidated_state_dict`: ZeRO-3's
`_zero3_consolidated_16bit_state_dict`, otherwise the module's own state dict); rank 0 loads
them into a plain (non-ZeRO) model built from `model.path` with the same LoRA, then saves a
merged HF model (`export=merged`) or the peft adapter (`export=adapter`) into `output_dir`,
with the tokenizer. `output_dir` must be on
storage that rank 0 and the driver share (it is on a single node, or with NFS).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from spd_ray import console
from spd_ray.config import FinetuneConfig, ModelConfig
from spd_ray.stages.deepspeed import DeepSpeedStrategy, deepspeed_config, resolve_precision

HISTORY_FILE = "train_history.jsonl"
SUMMARY_FILE = "train_summary.json"
EXPORT_FILE = "export.json"  # the saved dtype and the share of the update kept


def training_deepspeed_config(cfg: FinetuneConfig, dtype: torch.dtype,
                              overrides: dict | None = None) -> dict:
    """Stage 3's DeepSpeed config: ZeRO stage, offload, micro-batch, accumulation and clipping
    of `finetune`, over its `num_workers` ranks, in `dtype` (see `resolve_precision`)."""
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"finetune.zero_stage={cfg.zero_stage}; valid values: 0, 1, 2, 3")
    if cfg.offload_params and cfg.zero_stage != 3:
        raise ValueError(f"finetune.offload_params=true needs finetune.zero_stage=3 (only ZeRO-3 "
                         f"partitions the parameters), not {cfg.zero_stage}: set "
                         "finetune.zero_stage=3 or finetune.offload_params=false")
    if cfg.offload_optimizer and cfg.zero_stage == 0:
        raise ValueError("finetune.offload_optimizer=true needs finetune.zero_stage >= 1 (ZeRO "
                         "partitions the optimizer state it offloads): set finetune.zero_stage=1, "
                         "2 or 3, or finetune.offload_optimizer=false")
    return deepspeed_config(zero_stage=cfg.zero_stage, world_size=cfg.num_workers,
                            micro_batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                            max_grad_norm=cfg.max_grad_norm, dtype=dtype,
                            offload_optimizer=cfg.offload_optimizer,
                            offload_params=cfg.offload_params, pin_memory=bool(cfg.use_gpu),
                            overrides=overrides)


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


def _enable_gradient_checkpointing(model) -> None:
    """Non-reentrant: works with frozen inputs (LoRA) and ZeRO-3's parameter hooks."""
    kwargs = {"use_reentrant": False}
    # transformers 5.x renamed gradient_checkpointing_enable (kept as a deprecated alias)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# the share of the LoRA update a merged model must keep in model.dtype to be saved in it
# (export_dtype=auto); below, it is saved in float32
UPDATE_KEPT_ENOUGH = 0.99


def update_kept(before: dict, after: dict, dtype: torch.dtype) -> float:
    """How much of the update `after - before` (float32 weights by name) the weights keep once
    stored in `dtype`: the saved update's component along the true one, sum <saved, true> /
    sum |true|^2 (1: all of it; 0: rounded away). A bf16 weight of magnitude 0.02 has an ulp of
    1.2e-4, so per-element updates of the paper's lr (~1e-5) mostly round back to the weight."""
    dot = norm = 0.0
    for name, weight in after.items():
        true = weight - before[name]
        dot += float((true * (weight.to(dtype).float() - before[name])).sum())
        norm += float((true * true).sum())
    return dot / norm if norm else 1.0


def _export(cfg: FinetuneConfig, model: ModelConfig, state_dict: dict, output_dir: Path, dtype) -> None:
    """Rank 0: the consolidated weights into a plain model, saved as HF model or peft adapter
    (a model with its own code: with that code, which save_pretrained copies). LoRA is merged
    in float32 and saved in `dtype` (model.dtype) where that keeps the update, else in float32
    (`finetune.export_dtype`); `EXPORT_FILE` says which, and how much of the update the saved
    weights keep."""
    from spd_ray.core.modeling import from_pretrained, load_tokenizer
    from spd_ray.core.recipe import finished_model, prepare_model

    merge = cfg.method == "lora" and cfg.export == "merged"
    net = prepare_model(from_pretrained(model.path, torch.float32 if merge else dtype,
                                        model.trust_remote_code), cfg)
    expected = net.state_dict()
    bad = [k for k, v in state_dict.items()
           if k in expected and v.numel() != expected[k].numel()]
    if bad:  # the classic ZeRO-3 export bug: partitioned (size-0) tensors saved as weights
        raise RuntimeError(f"consolidated weights have wrong sizes (partitioned?): {bad[:5]}")
    net.load_state_dict(state_dict, strict=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    export = {"dtype": str(dtype).removeprefix("torch.")}
    if cfg.method == "lora" and cfg.export == "adapter":
        net.save_pretrained(str(output_dir))  # adapter_config.json + adapter weights
    elif merge:
        from peft.tuners.tuners_utils import BaseTunerLayer

        # the LoRA layers' weights before and after the merge, by their name in the merged model
        layers = {n.removeprefix("base_model.model."): m for n, m in net.named_modules()
                  if isinstance(m, BaseTunerLayer)}
        before = {n: m.get_base_layer().weight.detach().clone() for n, m in layers.items()}
        merged = finished_model(net)
        after = {n: merged.get_submodule(n).weight.detach() for n in layers}
        kept = update_kept(before, after, dtype)
        save = dtype if cfg.export_dtype == "model" or (cfg.export_dtype == "auto" and kept >= UPDATE_KEPT_ENOUGH) \
            else torch.float32
        export = {"dtype": str(save).removeprefix("torch."), "update_kept": 1.0 if save == torch.float32 else kept,
                  "update_kept_in_model_dtype": kept}
        merged.to(save).save_pretrained(str(output_dir))
    else:
        finished_model(net).save_pretrained(str(output_dir))
    (output_dir / EXPORT_FILE).write_text(json.dumps(export))
    load_tokenizer(model.path, model.trust_remote_code).save_pretrained(str(output_dir))


def _row_order(row: dict) -> tuple:
    """The corpus's canonical order: by id (stage 2's rows), else by text."""
    return (str(row.get("id", "")), str(row["prompt"]), str(row["completion"]))


class FinetuneRecipe:
    """One Ray Train worker's fine-tuning, in the order `train_loop_per_worker` runs it: set up
    (`__init__`: process group, engine, tokenizer), `resume`, `read_corpus`, `train` (per epoch:
    `epoch_batches`, `train_epoch`, whose optimizer steps end in `_end_step`, and
    `save_checkpoint`), `export`."""

    def __init__(self, config: dict):
        import ray
        import ray.train

        from spd_ray.core.batching import pad_id
        from spd_ray.core.modeling import load_tokenizer

        self.cfg = cfg = FinetuneConfig(**config["finetune"])
        self.model, self.output_dir = ModelConfig(**config["model"]), Path(config["output_dir"])
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.plan = epoch_plan(int(config["n_rows"]), self.world, cfg)
        self.spe, self.total_steps = self.plan["steps_per_epoch"], self.plan["total_steps"]
        self.ds = DeepSpeedStrategy(config["deepspeed"], gpu=cfg.use_gpu)
        self.ds.setup_distributed()
        self._setup_engine()
        self.say(f"ZeRO-{cfg.zero_stage} on {self.world} workers: {self.ds.partition_counts()}; "
                 f"plan {self.plan}")
        self.tokenizer = load_tokenizer(self.model.path, self.model.trust_remote_code)
        self.pad_id = pad_id(self.tokenizer)
        self.nodes = self.ds.all_gather_object(ray.get_runtime_context().get_node_id())
        self.step, self.history, self.start_step, self.start_epoch = 0, [], 0, 0
        self.wandb_run_id = config.get("wandb_run_id")
        self.progress_file = config.get("progress_file")

    def say(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[finetune] {msg}", flush=True)

    def _setup_engine(self) -> None:
        """The ORIGINAL weights (ZeRO-3: partitioned as they load), LoRA or all trainable, the
        recipe's AdamW and schedule, all in the DeepSpeed engine."""
        from spd_ray.core.recipe import optimizer_and_schedule, prepare_model

        torch.manual_seed(self.cfg.seed)
        model = self.ds.load_model(self.model.path, self.model.trust_remote_code)
        model.config.use_cache = False
        self.varlen = "flash" in str(getattr(model.config, "_attn_implementation", ""))
        if self.cfg.gradient_checkpointing:
            _enable_gradient_checkpointing(model)
        model = prepare_model(model, self.cfg)
        opt, sched = optimizer_and_schedule(model, self.cfg, self.total_steps, self.spe)
        self.ds.prepare(model, opt, sched)

    def resume(self) -> None:
        """Continue from Ray Train's latest checkpoint, if any, at its exact step: a mid-epoch
        checkpoint resumes inside its epoch."""
        state = self.ds.load_checkpoint()
        if state is None:
            return
        self.step, self.history = state["step"], state["history"]
        self.start_step, self.start_epoch = self.step, self.step // self.spe
        self.wandb_run_id = self.wandb_run_id or state.get("wandb_run_id")
        self.say(f"resumed at step {self.step} (epoch {self.start_epoch}, "
                 f"{self.step - self.start_epoch * self.spe} of its steps done)")

    def read_corpus(self) -> None:
        """Every worker reads the whole corpus, in its canonical order (Ray Data's streaming
        split hands blocks to workers as they come, in no fixed order)."""
        import ray.train

        self.rows = sorted(ray.train.get_dataset_shard("train").iter_rows(), key=_row_order)

    def train(self) -> None:
        """The epochs from the resumed one on, each ending with a checkpoint."""
        self.last_save = time.monotonic()  # the clock of checkpoint_every_s
        for epoch in range(self.start_epoch, self.plan["n_epochs"]):
            self.train_epoch(epoch)
            self.save_checkpoint(epoch)

    def epoch_batches(self, epoch: int) -> list[list[dict]]:
        """This rank's micro-batches of `epoch`: positions rank, rank + world, ... of the first
        rows_per_rank * world entries of a permutation drawn from finetune.seed and the epoch,
        so the data order is a function of the seed and the world size alone."""
        seed = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
        order = torch.randperm(len(self.rows), generator=seed)
        mine = [self.rows[i] for i in
                order[: self.plan["rows_per_rank"] * self.world][self.rank :: self.world].tolist()]
        size = self.cfg.batch_size
        batches = [mine[i : i + size] for i in range(0, len(mine), size)]
        if len(batches) != self.plan["micro_per_epoch"]:  # the plan and the split disagree: a bug
            raise RuntimeError(f"rank {self.rank} has {len(batches)} micro-batches in epoch "
                               f"{epoch}, expected {self.plan['micro_per_epoch']}")
        return batches

    def train_epoch(self, epoch: int) -> None:
        """Train this rank's micro-batches of `epoch`, skipping those trained before a resume
        (`done_here`: the same ones, the order being the seed's), the tail that fills no
        optimizer step and any past the last step."""
        accum = self.cfg.grad_accum
        acc, t0 = torch.zeros(4, dtype=torch.float64), time.perf_counter()
        batches = self.epoch_batches(epoch)
        done_here = (self.step - epoch * self.spe) * accum
        end = (min(self.total_steps, (epoch + 1) * self.spe) - epoch * self.spe) * accum
        for n_micro, batch in enumerate(batches[done_here:end], start=done_here + 1):
            inputs, n_tokens = self._inputs(batch)
            loss, lr = self.ds.train_micro_batch(inputs)
            acc += torch.tensor([loss.item(), 1.0, float(n_tokens), 0.0], dtype=torch.float64)
            if n_micro % accum == 0:  # an optimizer step just happened
                self.step += 1
                self._end_step(epoch, acc, lr, t0)
                acc.zero_()
                t0 = time.perf_counter()

    def _inputs(self, batch: list[dict]) -> tuple[dict, int]:
        """The model's inputs for `batch` (packed or padded, `finetune.packing`) and its number
        of real tokens."""
        from spd_ray.core.recipe import build_examples, collate, pack

        examples = build_examples(self.tokenizer, [str(r["prompt"]) for r in batch],
                                  [str(r["completion"]) for r in batch],
                                  max_length=self.cfg.max_length, loss_on=self.cfg.loss_on)
        n_tokens = sum(len(e["input_ids"]) for e in examples)
        if not self.cfg.packing:
            return collate(examples, self.pad_id), n_tokens
        # variable-length attention costs each row its own length: one sequence; else rows
        # share sequences as long as the longest row
        return pack(examples, self.pad_id, n_tokens if self.varlen else None), n_tokens

    def _end_step(self, epoch: int, acc: torch.Tensor, lr: float, t0: float) -> None:
        """After an optimizer step: loss, micro-batches and tokens (`acc`) summed over the
        ranks, rank 0's history entry, and a checkpoint every `checkpoint_every_steps` steps or
        `checkpoint_every_s` seconds (rank 0's clock, shared through the same all-reduce)."""
        cfg = self.cfg
        since_save = time.monotonic() - self.last_save
        acc[3] = float(self.rank == 0 and 0 < cfg.checkpoint_every_s < since_save)
        acc.copy_(self.ds.all_reduce(acc))
        elapsed = time.perf_counter() - t0
        grad_norm = self.ds.grad_norm()
        if self.rank == 0:
            self.history.append({
                "step": self.step, "total_steps": self.total_steps, "epoch": epoch,
                "loss": float(acc[0] / acc[1]), "lr": float(lr), "grad_norm": grad_norm,
                "tokens": int(acc[2]), "tokens_per_s": float(acc[2]) / max(elapsed, 1e-9)})
            if self.progress_file:
                Path(self.progress_file).write_text(json.dumps({"step": self.step, "total_steps": self.total_steps}))
        every = cfg.checkpoint_every_steps
        due = acc[3] > 0 or (every and self.step % every == 0)
        if due and self.step < min(self.total_steps, (epoch + 1) * self.spe):  # the epoch's end saves anyway
            self.save_checkpoint(epoch)

    def save_checkpoint(self, epoch: int) -> None:
        """A checkpoint of this step (every rank's shards, rank 0's step and history),
        reported to Ray Train with the run's metrics so far."""
        losses = [h["loss"] for h in self.history if h["epoch"] == epoch]
        metrics = {"epoch": epoch + 1, "epochs_total": self.plan["n_epochs"], "step": self.step,
                   "total_steps": self.total_steps, "finished": self.step >= self.total_steps,
                   "start_epoch": self.start_epoch, "start_step": self.start_step,
                   "steps_per_epoch": self.spe, "world_size": self.world,
                   "wandb_run_id": self.wandb_run_id,
                   "epoch_loss": sum(losses) / len(losses) if losses else float("nan"),
                   "nodes": sorted(set(self.nodes)),
                   **self.ds.partition_counts(), "history": self.history}
        name = f"step_{self.step:07d}"
        self.ds.save_checkpoint(name, {"step": self.step, "wandb_run_id": self.wandb_run_id,
                                       "history": self.history}, metrics)
        self.last_save = time.monotonic()
        self.say(f"{name}: step {self.step}/{self.total_steps} loss {metrics['epoch_loss']:.4f}")

    def export(self) -> None:
        """The gathered weights (every rank takes part) into `output_dir`, written by rank 0
        into a plain model once the engine is gone."""
        state_dict = self.ds.consolidated_state_dict()
        self.ds.close()
        if self.rank == 0:
            _export(self.cfg, self.model, state_dict, self.output_dir, self.ds.dtype)
            self.say(f"exported ({self.cfg.method}, {self.cfg.export}) to {self.output_dir}")


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: set up the engine, resume, train the epochs, export."""
    recipe = FinetuneRecipe(config)
    recipe.resume()
    recipe.read_corpus()
    recipe.train()
    recipe.export()


# ---------------------------------------------------------------------------------------
# The driver.


def _storage_uri(storage_path: str) -> str:
    return storage_path if "://" in storage_path else str(Path(storage_path).expanduser().resolve())


def _training_rows(dataset):
    """The `prompt`/`completion` (and `id`, if any) columns of `dataset`, materialized in the
    object store."""
    missing = {"prompt", "completion"} - set(dataset.columns())
    if missing:
        raise ValueError(f"the fine-tuning dataset lacks columns {sorted(missing)}; "
                         f"it has {dataset.columns()}")
    return dataset.select_columns(["id", "prompt", "completion"] if "id" in dataset.columns()
                                  else ["prompt", "completion"]).materialize()


def _save_results(result, output_dir: Path, n_rows: int, plan: dict, cut: dict) -> list[dict]:
    """Write the per-step history and the summary of a finished Ray Train run into `output_dir`;
    returns the history."""
    metrics = dict(result.metrics or {})
    history = metrics.pop("history", [])
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / HISTORY_FILE).write_text("".join(json.dumps(h) + "\n" for h in history))
    summary = {**metrics, "n_rows": n_rows, "plan": plan, "rows_cut": cut,
               "checkpoint": result.checkpoint.path if result.checkpoint else None}
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    return history


def finetune_on_ray(model: ModelConfig, cfg: FinetuneConfig, dataset, output_dir: Path | str,
                    run_name: str, storage_path: str, *, wandb_run_id: str | None = None,
                    ds_overrides: dict | None = None, progress_file: str | Path | None = None) -> list[dict]:
    """Fine-tune `model` on the `prompt`/`completion` rows of `dataset` with Ray Train +
    DeepSpeed into `output_dir`, a folder that loads with `from_pretrained` (export=merged) or
    `PeftModel.from_pretrained(base, output_dir)` (LoRA, export=adapter); returns the history
    (one entry per optimizer step).

    Same `run_name` + `storage_path` as an interrupted call: resumes from its last checkpoint.
    The precision is `model.dtype` (see `resolve_precision`: auto = bf16 on GPU, fp32 on CPU);
    `ds_overrides` is merged into the DeepSpeed config. Rank 0 writes each optimizer step to
    `progress_file` (JSON `{"step", "total_steps"}`, for the driver's progress bar).

    The driver materializes the corpus once in the object store (text: megabytes even for the
    paper's largest runs): it counts the rows for the schedule, and each worker, which reads the
    whole corpus, takes blocks from there instead of running the read and filter again."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from spd_ray.core.modeling import load_tokenizer

    tokenizer = load_tokenizer(model.path, model.trust_remote_code)  # fails fast (and clearly) on a wrong path
    if Path(model.path).expanduser().is_dir():
        model = dataclasses.replace(model, path=str(Path(model.path).expanduser().resolve()))
    dataset = _training_rows(dataset)
    n_rows = dataset.count()
    cut = rows_cut(tokenizer, dataset.take_all(), cfg)
    plan = epoch_plan(n_rows, cfg.num_workers, cfg)  # errors here, not in the workers
    ds_config = training_deepspeed_config(cfg, resolve_precision(model.dtype, cfg.use_gpu), ds_overrides)
    output_dir = Path(output_dir).expanduser().resolve()
    loop_config = {"finetune": dataclasses.asdict(cfg), "model": dataclasses.asdict(model),
                   "output_dir": str(output_dir), "n_rows": n_rows, "deepspeed": ds_config,
                   "wandb_run_id": wandb_run_id, "progress_file": progress_file and str(progress_file)}
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
    return _save_results(trainer.fit(), output_dir, n_rows, plan, cut)


def rows_cut(tokenizer, rows: list[dict], cfg: FinetuneConfig) -> dict:
    """How many training rows exceed `finetune.max_length` and lose the start of their prompt
    (`core.recipe.build_examples`), and how many lose the end of their completion too; a
    warning says so, with the setting that keeps them whole."""
    from spd_ray.core.recipe import build_examples

    examples = build_examples(tokenizer, [str(r["prompt"]) for r in rows], [str(r["completion"]) for r in rows],
                              max_length=cfg.max_length, loss_on=cfg.loss_on)
    cut = {"rows": len(rows), "prompt_cut": sum(e["prompt_cut"] > 0 for e in examples),
           "completion_cut": sum(e["completion_cut"] > 0 for e in examples)}
    if cut["prompt_cut"]:
        console.warn(f"stage 3: {cut['prompt_cut']} of {len(rows)} rows are longer than "
                     f"finetune.max_length={cfg.max_length} tokens and are trained without the start "
                     f"of their prompt ({cut['completion_cut']} also without the end of their "
                     "completion); raise finetune.max_length to keep them whole")
    return cut


@dataclass
class FinetuneResult:
    """Stage 3's outcome: the fine-tuned model in `path`, its per-step history, the export
    (`EXPORT_FILE`: the saved dtype and the share of the update kept) and the rows cut to
    `finetune.max_length`."""
    path: Path
    history: list[dict]
    export: dict = dataclasses.field(default_factory=dict)
    rows_cut: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> FinetuneResult:
        path = Path(path)
        lines = (path / HISTORY_FILE).read_text().splitlines()
        summary = json.loads((path / SUMMARY_FILE).read_text())
        export = path / EXPORT_FILE  # absent in the folders of earlier versions
        return cls(path, [json.loads(line) for line in lines if line],
                   json.loads(export.read_text()) if export.exists() else {}, summary.get("rows_cut", {}))

    def to_dict(self) -> dict:
        """What metrics.json holds of it."""
        return {"export": self.export, "rows_cut": self.rows_cut}

    def summary(self) -> str:
        if not self.history:
            return ""
        steps = self.history[-1]["step"]
        kept = self.export.get("update_kept")
        return (f"{steps} step{'' if steps == 1 else 's'}, "
                f"loss {self.history[0]['loss']:.4f} -> {self.history[-1]['loss']:.4f}"
                + (f", saved in {self.export['dtype']} keeping {kept:.1%} of the update" if kept is not None else ""))


def distill(model: ModelConfig, cfg: FinetuneConfig, generations: Path, n_rows: int, out: Path,
            resume_dir: Path, *, run_name: str, wandb_run_id: str | None = None) -> FinetuneResult:
    """Stage 3 (paper Eq. 14): the ORIGINAL `model` (round k of iterated SPD: round k-1's)
    fine-tuned on prompt + completion of stage 2's kept rows (`n_rows` of them), into `out`;
    Ray Train's checkpoints in `resume_dir`, from which a rerun resumes at the exact step (the
    console says where). The bar follows the optimizer steps (`training_step`)."""
    from spd_ray import data

    total = epoch_plan(n_rows, cfg.num_workers, cfg)["total_steps"]
    progress_file = resume_dir / "progress.json"
    progress_file.unlink(missing_ok=True)  # a killed run's: the checkpoint says where training resumes
    read = training_step(resume_dir / run_name, progress_file)
    done = read() or 0
    if done:
        console.echo(f"  stage 3: resuming at step {done} of {total} (from {resume_dir})")
    with console.progress("training", total, done=done, unit="steps") as bar:
        bar.poll(read)
        finetune_on_ray(model, cfg, ray.data.from_arrow(data.read_corpus(generations)),
                        out, run_name, str(resume_dir), wandb_run_id=wandb_run_id,
                        progress_file=progress_file)
    return FinetuneResult.load(out)


def training_step(train_dir: Path, progress_file: Path):
    """A reader of stage 3's latest optimizer step (None while there is none): the step rank 0
    writes to `progress_file` after each optimizer step (when the loop does), else that of the
    latest checkpoint Ray Train has recorded in `train_dir`. A step lower than the last one read
    means the worker group was restarted from a checkpoint: a warning says so."""
    last = [0]

    def read() -> int | None:
        step = None
        try:
            if progress_file.exists():
                step = int(json.loads(progress_file.read_text())["step"])
            else:
                snapshot = train_dir / "checkpoint_manager_snapshot.json"  # Ray Train's own record
                if snapshot.exists():
                    step = int(json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["step"])
        except (OSError, ValueError, KeyError, TypeError):  # caught mid-write, or not (yet) the format
            return None
        if step is not None:
            if step < last[0]:
                console.warn(f"stage 3: training went back from step {last[0]} to {step}: the worker "
                             "group was restarted from its last checkpoint (the driver log says why)")
            last[0] = step
        return step

    return read
