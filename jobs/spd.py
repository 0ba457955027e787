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
config (see spd_ray/artifacts.py). The stages are in spd_ray/pipeline.py. The console shows
each stage's start and end with its key figures, a progress bar per long stage, each warning
once, and the results; the rest of the output goes to runs/<run.name>/logs/driver.log
(--verbose: all of it on the console).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from spd_ray import artifacts, console, job, report
from spd_ray.config import load_config
from spd_ray.pipeline import prepare, run_pipeline
from spd_ray.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "testbed.yaml"))
    ap.add_argument("--verbose", action="store_true",
                    help="the full output of Ray, the libraries and the workers on the console "
                         "(run.verbose=true); by default it goes to runs/<name>/logs/driver.log")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. subspace.rank=32")
    args = ap.parse_args(argv)
    start = time.time()
    with job.session(args.verbose) as j:
        cfg = j.check(load_config, args.config, [*args.overrides, *(["run.verbose=true"] if args.verbose else [])])
        # the config, the task's data and its calibration labels, before any work (a GGUF
        # model.path: converted once, here)
        cfg, task, labels = j.check(prepare, cfg)
        run = artifacts.RunDir(cfg, data=task.fingerprints())
        console.log(f"run directory {run.path}")
        j.open_log(run.path / "logs" / "driver.log")
        with j.ray(cfg.run, cfg):  # what the stages ask of the cluster, before any of them
            tracker = Tracker(cfg, run.path)
            if tracker.where():
                console.echo(f"  W&B {tracker.where()}")
            console.echo("\n".join(labels.lines()))  # what the calibration loss will look at
            results = run_pipeline(cfg, task, run, tracker)  # Fig. 2, per round: stages 1-3, evaluation
            table = report.comparison_table(results.results(), results.reference())
            (run.path / "results.md").write_text(table)
            (run.path / "metrics.json").write_text(json.dumps({**results.to_dict(), "wall_time_s": time.time() - start}, indent=1))
            tracker.finish()
            console.echo("\n" + table)
            console.log(f"done in {console.duration(time.time() - start)}; artifacts in {run.path}")
    return j.status


if __name__ == "__main__":
    sys.exit(main())
