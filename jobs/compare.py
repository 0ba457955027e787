"""The paper's comparison in one command: methods x domains x seeds, then a report.

    python jobs/compare.py --config configs/compare/testbed.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/compare.py --config configs/compare/<x>.yaml

Every method is the SPD pipeline (spd_ray/pipeline.py, as jobs/spd.py runs it) with overrides
that change only how the training corpus is made (Base, inference-only projection, PSR, SSD, SPD
and its ablations). All runs share one artifact store, so whatever their configs agree on (the
base model's evaluation, the subspace, round 1 of iterated SPD) is computed once. The report
(Markdown + PNG) lands in <output_dir>/<name>/: mean +- std over seeds, out-of-domain scores,
the raw corpus's quality, subspace spectra and principal angles between domains and rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

from spd_ray import artifacts, console, job, report
from spd_ray.checks import check
from spd_ray.config import (
    CompareConfig,
    SPDConfig,
    load_compare_config,
    load_config,
    to_dict,
)
from spd_ray.core.subspace import CapabilitySubspace
from spd_ray.pipeline import PipelineResult, base_model, run_pipeline, subspace_stage
from spd_ray.stages.generate import projection_bite
from spd_ray.tasks.task import Task, load_task
from spd_ray.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]


def run_config(cc: CompareConfig, domain: str, method, seed: int) -> SPDConfig:
    base = Path(cc.domain_configs.get(domain, cc.base_config))
    base = base if base.is_absolute() else ROOT / base
    return load_config(base, [
        *cc.overrides, *cc.domain_overrides.get(domain, []), f"task.domain={domain}", f"generation.seed={seed}", f"finetune.seed={seed}",
        f"subspace.random_seed={seed}", *method.overrides,
        f"run.output_dir={Path(cc.output_dir) / cc.name / 'runs'}",
        f"run.name={domain}-{method.name}-s{seed}", f"run.wandb.group={cc.name}"])


def store_dir(cc: CompareConfig) -> Path:
    return (Path(cc.output_dir) / (cc.store or f"{cc.name}/store")).resolve()


def task_of(cfg: SPDConfig, tasks: dict) -> Task:
    """The run's task, loaded once for all the runs that read the same data."""
    key = json.dumps([to_dict(cfg.task), cfg.model.path], sort_keys=True)
    if key not in tasks:
        tasks[key] = load_task(cfg)
    return tasks[key]


def domain_subspace(cfg: SPDConfig, store: Path, tasks: dict) -> str:
    """Stage 1 alone: a domain's capability subspace, for the principal angles between domains."""
    task = task_of(cfg, tasks)
    run = artifacts.RunDir(cfg, store, data=task.fingerprints())
    return str(subspace_stage(cfg, run, task, "", Tracker(cfg, run.path), []).path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "compare" / "testbed.yaml"))
    ap.add_argument("--verbose", action="store_true",
                    help="the full output of Ray, the libraries and the workers on the console; by "
                         "default it goes to <output_dir>/<name>/logs/driver.log")
    ap.add_argument("overrides", nargs="*", help="dotted overrides of the comparison config, e.g. seeds=[42]")
    return ap.parse_args(argv)


def plan_runs(args: argparse.Namespace) -> tuple[CompareConfig, list[tuple], dict]:
    """The comparison config, its (domain, method, seed, run config) runs and their tasks
    (`task_of`): every run's config and data checked before any runs."""
    cc = load_compare_config(args.config, args.overrides)
    if args.verbose:
        cc = dataclasses.replace(cc, overrides=[*cc.overrides, "run.verbose=true"])
    plan, tasks = [], {}
    for d in cc.domains:
        for m in cc.methods:
            for s in cc.seeds:
                cfg = run_config(cc, d, m, s)
                check(cfg)
                cfg = base_model(cfg)  # a GGUF model.path: converted by the first run, then reused
                task_of(cfg, tasks)
                plan.append((d, m, s, cfg))
    return cc, plan, tasks


def run_records(domain: str, method, seed: int, res: PipelineResult) -> list[dict]:
    """The report's records of one run: the base model's scores (with the projection on, where
    the run made that evaluation) for a method that does not train, else each round's scores
    and corpus."""
    if not method.train:
        projected = res.rounds[0].projected if res.rounds else None
        evaluated = projected or res.base
        return [dict(domain=domain, method=method.name, seed=seed, round=1, corpus=None,
                     metrics=evaluated.metrics, correct=evaluated.correct)]
    return [dict(domain=domain, method=method.name, seed=seed, round=r.round,
                 metrics=r.evaluation.metrics, correct=r.evaluation.correct,
                 corpus=dataclasses.asdict(r.corpus))
            for r in res.rounds]


def run_plan(cc: CompareConfig, plan: list[tuple], tasks: dict, store: Path,
             exp: Path) -> tuple[list[dict], dict[str, str]]:
    """Every run of the plan, then stage 1 alone for each of `cc.subspace_domains` that no run
    gave a subspace: the report's records, and the gradient subspaces' paths by name."""
    records, subspaces = [], {}
    for i, (domain, method, seed, cfg) in enumerate(plan, 1):
        console.log(f"[{i}/{len(plan)}] {domain} / {method.name} / seed {seed}")
        task = task_of(cfg, tasks)
        run = artifacts.RunDir(cfg, store, data=task.fingerprints())
        tracker = Tracker(cfg, run.path)
        res = run_pipeline(cfg, task, run, tracker, train=method.train)
        tracker.finish()
        records += run_records(domain, method, seed, res)
        if seed == cc.seeds[0] and cfg.subspace.kind == "gradient":  # the same for every seed
            for r in res.rounds:
                if r.subspace:
                    subspaces.setdefault(f"{domain}/round{r.round}" if r.round > 1 else domain,
                                         str(r.subspace.path))
        (exp / "records.json").write_text(json.dumps(records, indent=1))  # a crash keeps what is done
    for domain in cc.subspace_domains:
        if domain not in subspaces:
            console.log(f"stage 1 for the {domain} subspace (principal angles between domains)")
            spd = next(m for m in cc.methods if m.train)
            subspaces[domain] = domain_subspace(run_config(cc, domain, spd, cc.seeds[0]), store, tasks)
    return records, subspaces


def projection_bites(plan: list[tuple], tasks: dict, subspaces: dict[str, str],
                     n_prompts: int = 128) -> dict[str, dict[str, dict[str, float]]]:
    """Subspace name -> domain of the prompts -> the share of the K/V activations' energy on
    `n_prompts` of that domain's training prompts outside the subspace (`projection_bite`)."""
    prompts = {}
    for domain, _, _, cfg in plan:
        prompts.setdefault(domain, task_of(cfg, tasks).train_prompts[:n_prompts])
    cfg = plan[0][3]
    return {name: {d: projection_bite(cfg.model, cfg.generation, path, p) for d, p in prompts.items()}
            for name, path in subspaces.items() if "/" not in name}  # round 1's subspaces


def publish(cc: CompareConfig, cfg: SPDConfig, exp: Path, records: list[dict],
            subspaces: dict[str, str], bites: dict, header: str) -> Path:
    """The report in `exp`, and the same results in W&B as one run of the experiment's group
    (named after the comparison, with `cfg`'s settings); returns the report's path."""
    path = report.write_report(exp, records, methods_order=[m.name for m in cc.methods], header=header,
                               subspaces={k: CapabilitySubspace.load(v) for k, v in subspaces.items()},
                               bites=bites)
    summary = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=f"{cc.name}-report"))
    tracker = Tracker(summary, exp)
    tracker.table("compare/summary", [{k: row[k] for k in ("domain", "method", "round", "metric", "mean", "std", "n")}
                                      for row in report.summarize(records)])
    tracker.images({f"compare/{p.stem}": p for p in sorted(exp.glob("*.png"))})
    tracker.finish()
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    with job.session(args.verbose) as j:
        cc, plan, tasks = j.check(plan_runs, args)  # every run's config and data, before any run
        exp = (Path(cc.output_dir) / cc.name).resolve()
        console.log(f"{len(plan)} runs into {exp}")
        j.open_log(exp / "logs" / "driver.log")
        with j.ray(plan[0][3].run, *(cfg for *_, cfg in plan)):  # what every run asks of the cluster
            records, subspaces = run_plan(cc, plan, tasks, store_dir(cc), exp)
            header = (f"Made by `python jobs/compare.py --config {args.config} {shlex.join(args.overrides)}`"
                      f" on {time.strftime('%Y-%m-%d')} in {(time.time() - start) / 60:.0f} min.\n")
            console.log("K/V energy outside each subspace on each domain's prompts")
            bites = projection_bites(plan, tasks, subspaces)
            path = publish(cc, plan[0][3], exp, records, subspaces, bites, header)
            console.log(f"report: {path}")
            console.echo(path.read_text())
    return j.status


if __name__ == "__main__":
    sys.exit(main())
