"""Is there anything to distill? The paper's Table 3 check on your model, before any training.

    python jobs/diagnose.py --config configs/<x>.yaml [--seeds 42 43 44] [key=value ...]
    ray job submit --working-dir . -- python jobs/diagnose.py --config configs/<x>.yaml

For the config's model, task and calibration set: stage 1 (the capability subspace), then stage
2 twice per seed on the same training prompts, with the same sampling settings and seeds, once
with K and V projected onto the subspace and once without; each raw corpus is scored against the
prompts' answers (nothing is trained or filtered). It prints the accuracy of both corpora with
95% intervals (bootstrap over prompts and seeds), their paired difference, the share of samples
the projection changed and the share of the K/V activations' energy on the prompts that the
projection removes. How to read it: README, "Is there anything to distill?". The table lands in
<run.output_dir>/<run.name>-diagnose/diagnose.md (and .json); every stage is an artifact there,
reused by a rerun.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # as jobs/spd.py: from a checkout, uninstalled

from spd_ray import artifacts, console, report  # noqa: E402
from spd_ray.config import ConfigError, load_config  # noqa: E402
from spd_ray.local_ray import ray_session  # noqa: E402
from spd_ray.pipeline import generation_stage, prepare, subspace_stage  # noqa: E402
from spd_ray.stages.generate import Projection, projection_bite  # noqa: E402
from spd_ray.stages.preflight import preflight  # noqa: E402
from spd_ray.tracking import Tracker  # noqa: E402

KINDS = ("projected", "unprojected")
READING = {"confirmed": "projected samples are more correct",
           "refuted": "projected samples are LESS correct: SPD has nothing to distill",
           "inconclusive": "no difference shown: SPD has nothing to distill that sampling lacks"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "testbed.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="sampling seeds")
    ap.add_argument("--energy-prompts", type=int, default=128,
                    help="training prompts on which the K/V energy outside the subspace is measured")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("overrides", nargs="*", help="dotted overrides of the pipeline config")
    return ap.parse_args(argv)


def arm_config(args: argparse.Namespace, out: Path, kind: str, seed: int):
    return load_config(args.config, [*args.overrides, f"generation.seed={seed}",
                                     f"generation.project={str(kind == 'projected').lower()}",
                                     f"run.output_dir={out}", f"run.name={kind}-s{seed}",
                                     *(["run.verbose=true"] if args.verbose else [])])


def table(rows: list[dict], bite: dict[str, float]) -> str:
    """The diagnosis as Markdown: the two corpora, their difference, and the projection's bite."""
    ref, proj = (next(r for r in rows if r["method"] == k) for k in ("unprojected", "projected"))
    diff = proj["vs_unprojected"]
    lines = ["| corpus | seeds | prompts | accuracy [95% interval] |", "|---|---|---|---|",
             *(f"| {r['method']} | {r['seeds']} | {r['items']} | {r['accuracy']} |" for r in (proj, ref)), "",
             f"projected - unprojected: {diff} ({READING[diff.verdict()]}; smallest detectable "
             f"difference {diff.mde:.3f})",
             f"samples the projection changed: {proj['changed']:.1%}",
             "K/V energy on the prompts outside the subspace: "
             + ", ".join(f"{k} {v:.1%}" for k, v in bite.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    try:
        cfg = load_config(args.config, args.overrides)
        out = Path(cfg.run.output_dir) / f"{cfg.run.name}-diagnose"
        arms = {(k, s): arm_config(args, out, k, s) for k in KINDS for s in args.seeds}
    except (ConfigError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with console.session(verbose=args.verbose):
        try:
            first, task, labels = prepare(arms[("projected", args.seeds[0])])
            arms = {arm: dataclasses.replace(c, model=first.model) for arm, c in arms.items()}  # GGUF: converted
            cfg = dataclasses.replace(cfg, model=first.model)
            if not task.train_items or not task.train_items[0].metric:
                raise ConfigError("the training prompts come without answers, so no corpus can be "
                                  "scored: give the training file the column the evaluation scorer "
                                  "reads (task.files.columns.gold, or tests for asserts), as the "
                                  "evaluation files have it")
        except (ConfigError, OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        console.open_log(out / "logs" / "driver.log")
        console.log(f"Table 3 check: {len(task.train_prompts)} prompts x {len(args.seeds)} seeds, "
                    f"projected and unprojected, into {out}")
        with ray_session(cfg.run) as ray_logs:
            try:
                preflight(*arms.values())
            except ConfigError as err:
                console.echo(f"error: {err}")
                return 2
            console.echo(f"  Ray logs {ray_logs}")
            console.echo("\n".join(labels.lines()))
            records, subspace = [], None
            for (kind, seed), c in arms.items():
                run = artifacts.RunDir(c, out / "store", data=task.fingerprints())
                tracker = Tracker(c, run.path)
                subspace = subspace_stage(c, run, task, "", tracker, [])  # one artifact for all arms
                projection = Projection.of(subspace.path, c.subspace) if kind == "projected" else None
                _, corpus = generation_stage(c, run, task, projection, "", tracker,
                                             ["subspace"] if projection else [])
                tracker.finish()
                records.append(dict(domain=cfg.task.domain, method=kind, seed=seed, round=1,
                                    corpus=dataclasses.asdict(corpus)))
            bite = projection_bite(cfg.model, cfg.generation, subspace.path,
                                   task.train_prompts[: args.energy_prompts])
        rows = report.corpus_intervals(records, ["projected", "unprojected"], reference="unprojected")
        text = table(rows, bite)
        (out / "diagnose.md").write_text(text + "\n")
        (out / "diagnose.json").write_text(json.dumps(
            {"rows": [{k: dataclasses.asdict(v) if hasattr(v, "mde") else v for k, v in r.items()} for r in rows],
             "energy_outside": bite, "seeds": args.seeds, "wall_time_s": time.time() - start}, indent=1))
        console.echo("\n" + text)
        console.log(f"done in {console.duration(time.time() - start)}; {out / 'diagnose.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
