"""How each stage's cost grows with its input: wall time and driver peak memory of stage 1
(calibration examples), stage 2 (prompts) and stage 3 (training rows) on the testbed model.

    python jobs/scaling.py                                   # the default points -> results/scaling/
    python jobs/scaling.py --stages 2 --points 250,1000,4000,8000 --out /tmp/scaling

Each point runs in a fresh process with its own local Ray, so that the driver's peak memory
(`ru_maxrss`) is that point's alone; its inputs are made before the clock starts, and the time
is the stage driver's call (`capability_subspace`, `self_generate`, `distill`), start-up of its
workers included. Then, per stage, a log-log plot of time and driver memory against the input
size and the slopes fitted to them (least squares on all points, and between the last two,
where start-up weighs least): a time slope above about 1.1, or driver memory that grows with the
input where it need not, is a defect.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = {"1": "calibration examples", "2": "prompts", "3": "training rows"}
POINTS = {"1": [50, 200, 800, 1600], "2": [250, 1000, 4000, 8000], "3": [160, 320, 640, 1280]}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_point(stage: str, n: int, out: Path) -> dict:
    """Stage `stage` on an input of size `n` in this process, on a new local Ray."""
    import pyarrow as pa

    from spd_ray import data, offline_by_default

    offline_by_default()
    from spd_ray.config import (
        CalibrationConfig,
        FinetuneConfig,
        GenerationConfig,
        ModelConfig,
        RunConfig,
        SubspaceConfig,
    )
    from spd_ray.local_ray import ray_session
    from spd_ray.tasks.testbed import make_split

    model = ModelConfig(device="cpu")
    with ray_session(RunConfig()):
        if stage == "1":
            from spd_ray.stages.calibrate import capability_subspace

            items = make_split("math", "calibration", n)
            run = lambda: capability_subspace(model, CalibrationConfig(batch_size=16), SubspaceConfig(),  # noqa: E731
                                              items, "correctness", out / "subspace")
        elif stage == "2":
            from spd_ray.stages.generate import self_generate

            prompts = [it.prompt for it in make_split("math", "train", n)]
            run = lambda: self_generate(model, GenerationConfig(max_new_tokens=32, batch_size=64),  # noqa: E731
                                        prompts, out / "generations", None)
        else:
            from spd_ray.stages.finetune import distill

            rows = [{"id": it.id, "prompt": it.prompt, "completion": it.answer}
                    for it in make_split("math", "train", n)]
            corpus = out / "corpus"
            corpus.mkdir(parents=True)
            data.write_parts([pa.Table.from_pylist(rows)], corpus, rows_per_part=256)
            cfg = FinetuneConfig(method="full", lr=1e-4, epochs=1.0, batch_size=16, max_length=256)
            run = lambda: distill(model, cfg, corpus, n, out / "model", out / "resume",  # noqa: E731
                                  run_name=f"scaling-{n}")
        before = peak_rss_mb()
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
    return {"stage": stage, "n": n, "seconds": seconds, "rss_before_mb": before,
            "peak_rss_mb": peak_rss_mb()}


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def plot(stage: str, points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [p["n"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "seconds", "wall time (s)"),
                           (axes[1], "peak_rss_mb", "driver peak RSS (MB)")):
        ys = [p[key] for p in points]
        ax.loglog(ns, ys, "o-")
        ax.set_xlabel(STAGES[stage])
        ax.set_ylabel(label)
        ax.set_title(f"stage {stage}: slope {slope(ns, ys):.2f}")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="1,2,3", help="comma list of 1, 2, 3")
    ap.add_argument("--points", default=None, help="input sizes (one list for every stage asked for)")
    ap.add_argument("--out", default="results/scaling", help="where the table, JSON and plots go")
    ap.add_argument("--one", nargs=2, metavar=("STAGE", "N"), help=argparse.SUPPRESS)  # a child
    args = ap.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(one_point(args.one[0], int(args.one[1]), Path(tmp))))
        return 0
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if bad := [s for s in stages if s not in STAGES]:
        ap.error(f"unknown stage(s) {bad}; choose from {sorted(STAGES)}")
    try:
        custom = [int(x) for x in args.points.split(",")] if args.points else None
    except ValueError:
        ap.error(f"--points {args.points!r}: give positive integers separated by commas, e.g. 250,1000,4000")
    if custom is not None and (len(custom) < 2 or min(custom) < 1):
        ap.error(f"--points {args.points!r}: at least two sizes, each >= 1, to fit a slope")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for stage in stages:
        sizes = custom or POINTS[stage]
        for n in sizes:
            done = subprocess.run([sys.executable, __file__, "--one", stage, str(n)],
                                  capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"stage {stage} at {n} failed (exit {done.returncode}); see above")
            point = json.loads(done.stdout.strip().splitlines()[-1])
            results.setdefault(stage, []).append(point)
            print(f"stage {stage}, {n} {STAGES[stage]}: {point['seconds']:.1f} s, driver peak "
                  f"{point['peak_rss_mb']:.0f} MB (before the stage {point['rss_before_mb']:.0f} MB)", flush=True)
        plot(stage, results[stage], out / f"stage{stage}.png")
    lines = ["| stage | input | sizes | seconds | time slope (all / last two) | driver peak MB | memory slope (all / last two) |",
             "|---|---|---|---|---|---|---|"]
    for stage, pts in results.items():
        ns, ts, ms = [p["n"] for p in pts], [p["seconds"] for p in pts], [p["peak_rss_mb"] for p in pts]
        lines.append(f"| {stage} | {STAGES[stage]} | {', '.join(map(str, ns))} | "
                     f"{', '.join(f'{t:.1f}' for t in ts)} | {slope(ns, ts):.2f} / {slope(ns[-2:], ts[-2:]):.2f} | "
                     f"{', '.join(f'{m:.0f}' for m in ms)} | {slope(ns, ms):.2f} / {slope(ns[-2:], ms[-2:]):.2f} |")
    table = "\n".join(lines)
    print("\n" + table)
    (out / "scaling.md").write_text(table + "\n")
    (out / "scaling.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
