"""Self-Policy Distillation, end to end.

    python jobs/spd.py                                  # the embedded testbed, on this machine
    python jobs/spd.py --config configs/testbed.yaml subspace.rank_mode=energy

Stage 1  calibration: gradients of the correctness-span loss w.r.t. the pre-RoPE k_proj/v_proj
         outputs of the target layers -> one capability subspace per layer, for K and for V.
Stage 2  projected self-generation: sample one raw completion per training prompt while K and V
         are projected onto the subspace (folded into the weights of a copy of the model).
Stage 3  distillation: fine-tune the ORIGINAL model on prompt + completion, next-token loss.
Then     evaluation of base vs SPD: greedy, projection off, raw prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded default never needs a network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from spd_ray import artifacts, data  # noqa: E402
from spd_ray.config import ConfigError, SPDConfig, load_config  # noqa: E402
from spd_ray.evaluation import evaluate_model  # noqa: E402
from spd_ray.finetune import build_examples, train  # noqa: E402
from spd_ray.generation import generate  # noqa: E402
from spd_ray.gradients import accumulate_kv_gradient_stats  # noqa: E402
from spd_ray.modeling import load_model, load_tokenizer, resolve_layers  # noqa: E402
from spd_ray.projection import fold_projection, projection_hooks  # noqa: E402
from spd_ray.spans import calibration_batches  # noqa: E402
from spd_ray.subspace import build_subspace  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stage1_subspace(cfg: SPDConfig, model, tokenizer, calibration):
    """Calibration gradients -> sufficient statistics -> capability subspace."""
    rules = [it.span_rule if cfg.task.calibration_loss == "correctness" else "full" for it in calibration]
    batches, skipped = calibration_batches(
        tokenizer, [it.text for it in calibration], rules, batch_size=cfg.calibration.batch_size,
        max_length=cfg.calibration.max_length, task=cfg.task.domain)
    layers = resolve_layers(model, cfg.calibration.layers)
    stats, loss = accumulate_kv_gradient_stats(model, batches, layers)
    meta = {"model": cfg.model.path, "layers": layers, "calibration_loss": cfg.task.calibration_loss,
            "n_calibration": len(calibration) - skipped, "skipped": skipped,
            "calibration_hash": data.fingerprint([it.text for it in calibration]),
            "mean_calibration_loss": loss}
    subspace = build_subspace(stats, rank_mode=cfg.subspace.rank_mode, rank=cfg.subspace.rank,
                              energy=cfg.subspace.energy, center=cfg.subspace.center, meta=meta)
    return subspace


def stage2_generate(cfg: SPDConfig, model, tokenizer, subspace, prompts: list[str]) -> list[dict]:
    """Raw completions sampled with K/V projected onto the capability subspace."""
    g = cfg.generation
    rows = data.sampling_rows(prompts, g.n_samples, g.seed)
    progress = artifacts.Progress("stage 2 generation", len(rows), log)

    def sample(m):
        return generate(m, tokenizer, [r["prompt"] for r in rows], max_new_tokens=g.max_new_tokens,
                        temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                        seeds=[r["seed"] for r in rows], batch_size=g.batch_size,
                        on_batch=progress.advance)

    if not g.project:
        completions = sample(model)
    elif cfg.subspace.apply == "fold":
        completions = sample(fold_projection(model, subspace, cfg.subspace.mode))
    else:
        with projection_hooks(model, subspace, cfg.subspace.mode):
            completions = sample(model)
    kept, counts = data.keep_usable([{**r, "completion": c} for r, c in zip(rows, completions)],
                                    tokenizer, cfg.finetune.max_length)
    log(f"  dropped {counts['empty']} empty completions; {counts['truncated']} will be truncated "
        f"to {cfg.finetune.max_length} tokens")
    return kept


def stage3_finetune(cfg: SPDConfig, tokenizer, corpus: list[dict]):
    """Fine-tune the original weights on prompt + completion (paper Eq. 14)."""
    model = load_model(cfg.model.path, cfg.model.dtype, cfg.model.device, cfg.model.trust_remote_code)
    rows = build_examples(tokenizer, [r["prompt"] for r in corpus], [r["completion"] for r in corpus],
                          max_length=cfg.finetune.max_length, loss_on=cfg.finetune.loss_on)
    progress = artifacts.Progress("stage 3 fine-tuning", None, log)
    return train(model, tokenizer, rows, cfg.finetune, on_step=progress.step)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "testbed.yaml"))
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. subspace.rank=32")
    args = ap.parse_args(argv)
    start = time.time()
    transformers.utils.logging.disable_progress_bar()  # the job prints its own progress
    datasets.disable_progress_bars()
    try:
        cfg = load_config(args.config, args.overrides)
        model = load_model(cfg.model.path, cfg.model.dtype, cfg.model.device, cfg.model.trust_remote_code)
        tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    except (ConfigError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    run = artifacts.RunDir(cfg)
    log(f"run directory {run.path}")
    task = data.load_task(cfg)

    log(f"stage 1: capability subspace from {len(task.calibration)} calibration examples")
    subspace = run.cached("subspace", lambda: stage1_subspace(cfg, model, tokenizer, task.calibration))
    log("stage 1 done: " + ", ".join(f"L{layer}.{kind} r={b.shape[1]} energy={subspace.energy[(layer, kind)]:.2f}"
                                     for (layer, kind), b in sorted(subspace.bases.items())))

    log(f"stage 2: projected self-generation for {len(task.train_prompts)} prompts")
    corpus = run.cached("generations", lambda: stage2_generate(cfg, model, tokenizer, subspace, task.train_prompts))
    log(f"stage 2 done: {len(corpus)} completions kept")

    log(f"stage 3: fine-tuning ({cfg.finetune.method}) on {len(corpus)} samples")
    student = run.cached("model", lambda: stage3_finetune(cfg, tokenizer, corpus))

    log("evaluation: greedy, projection off")
    metrics = {
        "base": run.cached("eval_base", lambda: evaluate_model(model, tokenizer, task.eval_splits, cfg.evaluation)),
        "spd": run.cached("eval_spd", lambda: evaluate_model(student, tokenizer, task.eval_splits, cfg.evaluation)),
    }
    table = artifacts.comparison_table(metrics)
    run.write_text("results.md", table)
    (run.path / "metrics.json").write_text(json.dumps(
        {**metrics, "wall_time_s": time.time() - start, "n_generated": len(corpus)}, indent=1))
    print("\n" + table)
    log(f"done in {time.time() - start:.0f} s; artifacts in {run.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
