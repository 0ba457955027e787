"""Dry run of a config's task: read and validate its data, and show what the calibration loss
will look at, in seconds, before any run.

    python jobs/check_task.py --config configs/<x>.yaml [key=value ...]

Loads the config, the model's tokenizer (no weights) and the task (for task.source=files, every
file of task.files), then prints the rows of each part, the evaluation splits with their scorers,
and the label report: examples labeled, labeled tokens per example, examples skipped and why, and
a few examples with their labeled tokens marked ⟦ ⟧. No Ray. Exit 0, or 2 with `error: ...` on
bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from spd_ray import offline_by_default

ROOT = Path(__file__).resolve().parents[1]

offline_by_default()  # as the pipeline: before transformers or datasets is imported
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # a bar per file read hides the report

from spd_ray.config import SPDConfig, load_config  # noqa: E402
from spd_ray.core.modeling import load_tokenizer  # noqa: E402
from spd_ray.tasks.labels import label_report  # noqa: E402
from spd_ray.tasks.task import Task, load_task  # noqa: E402


def summary(cfg: SPDConfig, task: Task) -> list[str]:
    """Rows per part of the task (and the file each came from), the evaluation splits' scorers."""
    t = cfg.task
    paths = {}
    if t.source == "files":
        paths = {"calibration": t.files.calibration, "train": t.files.train,
                 **{f"{t.domain}/{split}": path for split, path in t.files.eval.items()}}
    parts = {"calibration": task.calibration, "train": task.train_items, **task.eval_splits}
    width = max(map(len, parts))
    lines = [f"task {t.domain} (task.source={t.source})"]
    for name, items in parts.items():
        scorers = ", ".join(sorted({it.metric for it in items})) if name in task.eval_splits else ""
        lines.append(f"  {name:<{width}}  {len(items):>6} rows" + (f"  scorer {scorers}" if scorers else "")
                     + (f"  from {paths[name]}" if name in paths else ""))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "testbed.yaml"))
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. task.n_calibration=20")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
        task = load_task(cfg)
        report = label_report(cfg, tokenizer, task.calibration)
        report.require_labels(cfg.task.domain)  # none labeled: the error holds the report
    except (OSError, ValueError, RuntimeError) as err:  # ConfigError and TaskDataError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join([*summary(cfg, task), *report.lines()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
