"""Self-Policy Distillation, end to end, as one Ray job.

    python jobs/spd.py                          # embedded testbed on a local Ray (this machine)
    ray job submit --working-dir . -- python jobs/spd.py --config configs/<x>.yaml [key=value ...]

Stage 1  calibration: gradients of the correctness-span loss w.r.t. the pre-RoPE k_proj/v_proj
         outputs of the target layers, summed over Ray workers -> one capability subspace per
         layer, for K and for V.
Stage 2  projected self-generation: a Ray Data actor pool samples one raw completion per
         training prompt with K and V projected onto the subspace (folded into the weights).
Stage 3  distillation: Ray Train + DeepSpeed fine-tunes the ORIGINAL model on prompt +
         completion with plain next-token loss.
Then     evaluation of base vs SPD: greedy, projection off, raw prompts.

Every artifact lands in runs/<run.name>/; a rerun skips each stage already done with the same
config (see spd_ray/artifacts.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded default never needs a network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import ray  # noqa: E402

from spd_ray import artifacts, data  # noqa: E402
from spd_ray.config import ConfigError, SPDConfig, load_config  # noqa: E402
from spd_ray.modeling import load_tokenizer, num_layers, resolve_layers  # noqa: E402
from spd_ray.ray_calibrate import distributed_kv_stats  # noqa: E402
from spd_ray.ray_finetune import finetune_on_ray  # noqa: E402
from spd_ray.ray_generate import evaluate_on_ray, generate_dataset, save_folded_checkpoint  # noqa: E402
from spd_ray.spans import calibration_batches  # noqa: E402
from spd_ray.subspace import CapabilitySubspace, build_subspace  # noqa: E402
from spd_ray.tracking import Tracker  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stage1_subspace(cfg: SPDConfig, tokenizer, calibration, out: Path, tracker: Tracker) -> None:
    """Calibration gradients on Ray workers -> summed statistics -> capability subspace."""
    loss_kind = cfg.task.calibration_loss
    rules = [it.span_rule if loss_kind == "correctness" else "full" for it in calibration]
    batches, skipped = calibration_batches(
        tokenizer, [it.text for it in calibration], rules, batch_size=cfg.calibration.batch_size,
        max_length=cfg.calibration.max_length, task=cfg.task.domain)
    layers = resolve_layers(num_layers(cfg.model.path, cfg.model.trust_remote_code), cfg.calibration.layers)
    stats, loss, nodes = distributed_kv_stats(cfg, batches, layers)
    s = cfg.subspace
    subspace = build_subspace(stats, rank_mode=s.rank_mode, rank=s.rank, energy=s.energy,
                              center=s.center, meta={
                                  "model": cfg.model.path, "layers": layers, "calibration_loss": loss_kind,
                                  "n_calibration": len(calibration) - skipped, "skipped": skipped,
                                  "calibration_hash": data.fingerprint([it.text for it in calibration]),
                                  "mean_calibration_loss": loss, "worker_nodes": nodes})
    subspace.save(out)
    tracker.log({"stage1/calibration_loss": loss, "stage1/skipped": skipped})
    tracker.spectra(subspace)


def stage2_generate(cfg: SPDConfig, prompts: list[str], subspace_dir: Path, out: Path,
                    tracker: Tracker) -> None:
    """Raw completions from the actor pool, K/V projected onto the capability subspace."""
    g = cfg.generation
    start = time.time()
    rows = data.sampling_rows(prompts, g.n_samples, g.seed)
    folded = None
    if g.backend == "vllm" and g.project:  # vLLM reads weights from disk: fold them there once
        folded = ray.get(save_folded_checkpoint.options(num_gpus=g.gpus_per_replica).remote(
            cfg.model, str(subspace_dir), cfg.subspace.mode, str(out.with_name("folded_model"))))
    ds = generate_dataset(ray.data.from_items(rows), cfg.model, g,
                          subspace_dir=subspace_dir if g.project else None,
                          mode=cfg.subspace.mode, apply=cfg.subspace.apply, folded_checkpoint=folded)
    ds = ds.filter(lambda row: bool(row["completion"].strip())).materialize()  # only empty text is dropped
    ds.write_parquet(str(out))
    kept = ds.count()
    lengths = ds.map(lambda row: {"chars": len(row["completion"])})
    stats = {"stage2/completions": kept, "stage2/dropped_empty": len(rows) - kept,
             "stage2/samples_per_s": len(rows) / (time.time() - start),
             "stage2/mean_completion_chars": lengths.mean("chars") if kept else 0.0}
    log("  " + ", ".join(f"{k.split('/')[1]} {v:.1f}" for k, v in stats.items()))
    tracker.log(stats)
    tracker.table("stage2/samples", [{k: r[k] for k in ("id", "prompt", "completion")} for r in ds.take(32)])


def stage3_finetune(cfg: SPDConfig, generations: Path, out: Path, run: artifacts.RunDir,
                    tracker: Tracker) -> None:
    """Ray Train + DeepSpeed on prompt + completion, starting from the ORIGINAL weights."""
    finetune_on_ray(cfg.finetune, cfg.model.path, ray.data.read_parquet(str(generations)),
                    output_dir=out, run_name=f"{cfg.run.name}-finetune",
                    storage_path=str(run.path / "train"), wandb_run_id=tracker.run_id,
                    on_metrics=lambda entry: tracker.log({f"stage3/{k}": v for k, v in entry.items()}))


def evaluate(cfg: SPDConfig, model_path: str, splits, out: Path) -> None:
    model = dataclasses.replace(cfg.model, path=model_path)
    out.write_text(json.dumps(evaluate_on_ray(model, cfg.generation, cfg.evaluation, splits), indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "testbed.yaml"))
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. subspace.rank=32")
    args = ap.parse_args(argv)
    start = time.time()
    try:
        cfg = load_config(args.config, args.overrides)
        tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    except (ConfigError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    connect_ray(cfg)
    run = artifacts.RunDir(cfg)
    tracker = Tracker(cfg, run.path)
    log(f"run directory {run.path}")
    task = data.load_task(cfg)

    log(f"stage 1: capability subspace from {len(task.calibration)} calibration examples "
        f"on {cfg.calibration.num_workers} workers")
    subspace_dir = run.stage("subspace", lambda out: stage1_subspace(cfg, tokenizer, task.calibration, out, tracker))
    subspace = CapabilitySubspace.load(subspace_dir)
    log("stage 1 done: " + ", ".join(f"L{layer}.{kind} r={b.shape[1]} energy={subspace.energy[(layer, kind)]:.3f}"
                                     for (layer, kind), b in sorted(subspace.bases.items())))

    log(f"stage 2: projected self-generation for {len(task.train_prompts)} prompts")
    generations = run.stage("generations", lambda out: stage2_generate(cfg, task.train_prompts, subspace_dir, out, tracker))

    log(f"stage 3: fine-tuning ({cfg.finetune.method}, ZeRO-{cfg.finetune.zero_stage}) "
        f"on {cfg.finetune.num_workers} workers")
    model_dir = run.stage("model", lambda out: stage3_finetune(cfg, generations, out, run, tracker))

    log("evaluation: greedy, projection off")
    base = run.stage("eval_base.json", lambda out: evaluate(cfg, cfg.model.path, task.eval_splits, out))
    spd = run.stage("eval_spd.json", lambda out: evaluate(cfg, str(model_dir), task.eval_splits, out))
    metrics = {"base": json.loads(base.read_text()), "spd": json.loads(spd.read_text())}
    tracker.log({f"eval/{m}/{k}": v for m, vals in metrics.items() for k, v in vals.items()})
    table = artifacts.comparison_table(metrics)
    (run.path / "results.md").write_text(table)
    (run.path / "metrics.json").write_text(json.dumps({**metrics, "wall_time_s": time.time() - start}, indent=1))
    tracker.finish()
    print("\n" + table)
    log(f"done in {time.time() - start:.0f} s; artifacts in {run.path}")
    return 0


def connect_ray(cfg: SPDConfig) -> None:
    """Join the cluster this job was submitted to (or run.ray_address); else start a local Ray."""
    if ray.is_initialized():
        return
    env = {"env_vars": {"HF_HUB_OFFLINE": os.environ["HF_HUB_OFFLINE"],
                        "HF_DATASETS_OFFLINE": os.environ["HF_DATASETS_OFFLINE"]}}
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=env)
    else:  # more logical CPUs than cores, so the stages' actors and tasks never starve each other
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, runtime_env=env)


if __name__ == "__main__":
    sys.exit(main())
