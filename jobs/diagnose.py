"""Is there anything to distill? The paper's Table 3 check on your model, before any training.

    python jobs/diagnose.py --config configs/<x>.yaml [--seeds 42 43 44] [--arms arms.yaml] [key=value ...]
    ray job submit --working-dir . -- python jobs/diagnose.py --config configs/<x>.yaml

For the config's model, task and calibration set: stage 1 (the capability subspace), then stage
2 on the same training prompts once per arm and seed, with the same sampling settings and seeds
(so each row draws the same noise in every arm): the `unprojected` reference (plain samples, as
SSD makes them) and, by default, one `projected` arm (the config's subspace). `--arms` names
other arms, each a list of overrides, in a YAML file (e.g. ranks, `subspace.kind=activation` or
`random`, `subspace.beta=0.5`); arms that agree on their subspace share it. Each raw corpus is
scored against the prompts' answers (nothing is trained or filtered). Per arm it prints:
- the corpus's accuracy, with its 95% interval (bootstrap over prompts and seeds), and its paired
  difference to the unprojected corpus (and to `--control`, an arm of the file), with the
  smallest difference the run could detect;
- the share of samples the projection changed, and the share of the K/V activations' energy on
  the prompts that its subspace leaves out;
- how the projection moves the model's belief in the right answer: the teacher-forced
  log-probability of the gold answer after each prompt and the answer's marker (`#### ` for the
  final_number rule, `Answer: ` for answer_letter), mean and paired difference to unprojected;
- what the samples look like: mean length in tokens, the share that stop before
  generation.max_new_tokens, and the share that carry the answer marker.
How to read it: README, "Is there anything to distill?". The table lands in
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

import torch
import yaml

from spd_ray import artifacts, checks, console, data, job, report
from spd_ray.config import ConfigError, load_config
from spd_ray.core.modeling import load_tokenizer
from spd_ray.pipeline import generation_stage, prepare, subspace_stage
from spd_ray.stages.evaluate import answer_logprobs_on_ray
from spd_ray.stages.generate import Projection, projection_bite
from spd_ray.stats import mean_interval, paired_difference
from spd_ray.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]

REFERENCE = "unprojected"
DEFAULT_ARMS = {"projected": []}
READING = {"confirmed": "projected samples are more correct",
           "refuted": "projected samples are LESS correct: SPD has nothing to distill",
           "inconclusive": "no difference shown: SPD has nothing to distill that sampling lacks"}
# the text after which each span rule's answer comes: the gold's log-probability is read there
MARKERS = {"final_number": "#### ", "answer_letter": "Answer: "}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "testbed.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="sampling seeds")
    ap.add_argument("--arms", default=None,
                    help="YAML file: arm name -> list of overrides (default: one arm, `projected`, "
                         "the config's subspace); the unprojected reference is always run")
    ap.add_argument("--control", default=None, help="an arm of --arms every other arm is also compared to")
    ap.add_argument("--energy-prompts", type=int, default=128,
                    help="training prompts on which the K/V energy outside each subspace is measured")
    ap.add_argument("--probe-prompts", type=int, default=256,
                    help="training prompts on which the gold answer's log-probability is measured")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("overrides", nargs="*", help="dotted overrides of the pipeline config, for every arm")
    return ap.parse_args(argv)


def read_arms(args: argparse.Namespace) -> dict[str, list[str]]:
    """The arms to run besides the unprojected reference, checked: names are folder names, each
    with a list of overrides; --control names one of them."""
    if args.arms is None:
        arms = DEFAULT_ARMS
    else:
        try:
            arms = yaml.safe_load(Path(args.arms).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"--arms {args.arms}: cannot read it as YAML ({err})") from None
        if not isinstance(arms, dict) or not arms or not all(
                isinstance(v, list) and all(isinstance(o, str) for o in v) for v in arms.values()):
            raise ConfigError(f"--arms {args.arms} must map each arm's name to a list of overrides, "
                              "e.g. {rank32: [subspace.rank_mode=fixed, subspace.rank=32]}")
    if REFERENCE in arms:
        raise ConfigError(f"--arms: {REFERENCE!r} is the reference every run has; name the arm otherwise")
    if args.control is not None and args.control not in arms:
        raise ConfigError(f"--control {args.control} is not an arm of --arms ({list(arms)})")
    return {REFERENCE: ["generation.project=false"], **arms}  # the reference runs first


def arm_config(args: argparse.Namespace, out: Path, arm: str, overrides: list[str], seed: int):
    return load_config(args.config, [*args.overrides, "generation.project=true", *overrides,
                                     f"generation.seed={seed}", f"run.output_dir={out}",
                                     f"run.name={arm}-s{seed}", *(["run.verbose=true"] if args.verbose else [])])


def samples(generations: Path, tok, max_new_tokens: int, marker: str | None) -> dict[str, float]:
    """What a corpus's samples look like: mean length in tokens, the share that stop before the
    cap (a row re-tokenized to fewer tokens than the cap ended at its EOS) and that carry the
    answer marker."""
    texts = data.read_corpus(generations).column("completion").to_pylist()
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []
    n = max(1, len(texts))
    return {"tokens": sum(lengths) / n, "stopped": sum(x < max_new_tokens for x in lengths) / n,
            "marked": None if marker is None else sum(marker.strip() in t for t in texts) / n}


def logprob_rows(scored: list[tuple[float, int]]) -> torch.Tensor:
    """The gold answer's log-probability per prompt, as one row (a seedless arm)."""
    return torch.tensor([[lp for lp, _ in scored]], dtype=torch.float64)


def table(rows: list[dict], control: str | None) -> str:
    """The diagnosis as Markdown: one row per arm, then the reading of each."""
    head = ["arm", "prompts x seeds", "corpus accuracy [95%]", "vs unprojected [95%] (MDE)",
            *([f"vs {control} [95%]"] if control else []), "changed", "K/V energy outside",
            "gold log-prob (vs unprojected)", "tokens", "stop", "marker"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        diff = r.get("vs_unprojected")
        lp, lpd = r["gold_logprob"], r.get("gold_logprob_vs_unprojected")
        cells = [r["arm"], f"{r['items']} x {r['seeds']}", str(r["accuracy"]),
                 f"{diff} ({diff.mde:.3f})" if diff else "-",
                 *([str(r[f"vs_{control}"]) if r.get(f"vs_{control}") else "-"] if control else []),
                 f"{r['changed']:.1%}" if r.get("changed") is not None else "-",
                 ", ".join(f"{k} {v:.0%}" for k, v in r["energy"].items()) if r.get("energy") else "-",
                 f"{lp.mean:.3f}" + (f" ({lpd})" if lpd else ""),
                 f"{r['samples']['tokens']:.0f}", f"{r['samples']['stopped']:.0%}",
                 "-" if r["samples"]["marked"] is None else f"{r['samples']['marked']:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for r in rows:
        if r.get("vs_unprojected"):
            lines.append(f"- {r['arm']} - unprojected: {r['vs_unprojected']} "
                         f"({READING[r['vs_unprojected'].verdict()]})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    with job.session(args.verbose) as j:
        cfg = j.check(load_config, args.config, args.overrides)
        out = Path(cfg.run.output_dir) / f"{cfg.run.name}-diagnose"
        arms = j.check(read_arms, args)
        runs = {(arm, s): j.check(arm_config, args, out, arm, ov, s) for arm, ov in arms.items() for s in args.seeds}
        for c in runs.values():  # every arm's own settings, before any work
            j.check(checks.check, c)
        first, task, labels = j.check(prepare, runs[(next(a for a in arms if a != REFERENCE), args.seeds[0])])
        runs = {k: dataclasses.replace(c, model=first.model) for k, c in runs.items()}  # GGUF: converted
        if not task.train_items or not task.train_items[0].metric:
            raise job.Refused("the training prompts come without answers, so no corpus can be scored: give "
                              "the training file the column the evaluation scorer reads "
                              "(task.files.columns.gold, or tests for asserts), as the evaluation files have it")
        console.log(f"Table 3 check: {len(task.train_prompts)} prompts x {len(args.seeds)} seeds, arms "
                    f"{', '.join(arms)}, into {out}")
        j.open_log(out / "logs" / "driver.log")
        rule = first.task.files.spans.rule if first.task.source == "files" else \
            (task.calibration[0].span_rule if task.calibration else None)
        marker = MARKERS.get(rule or "")
        probes = task.train_items[: args.probe_prompts]
        tok = load_tokenizer(first.model.path, first.model.trust_remote_code)
        with j.ray(first.run, *runs.values()):
            console.echo("\n".join(labels.lines()))
            records, extra = [], {}
            for arm in arms:
                for seed in args.seeds:
                    c = runs[(arm, seed)]
                    run = artifacts.RunDir(c, out / "store", data=task.fingerprints())
                    tracker = Tracker(c, run.path)
                    subspace = subspace_stage(c, run, task, "", tracker, []) if arm != REFERENCE else None
                    projection = Projection.of(subspace and subspace.path, c.subspace)
                    generations, corpus = generation_stage(c, run, task, projection, "", tracker,
                                                           ["subspace"] if projection else [])
                    tracker.finish()
                    records.append(dict(domain=c.task.domain, method=arm, seed=seed, round=1,
                                        corpus=dataclasses.asdict(corpus)))
                    if seed == args.seeds[0]:  # per arm: the subspace and the model, not the seed
                        console.log(f"{arm}: energy outside, gold log-probability, the samples' shape")
                        extra[arm] = {
                            "energy": projection and projection_bite(c.model, c.generation, subspace.path,
                                                                     task.train_prompts[: args.energy_prompts]),
                            "gold": answer_logprobs_on_ray(
                                c.model, c.generation, [it.prompt + (marker or "") for it in probes],
                                [it.gold for it in probes], c.evaluation.batch_size, projection),
                            "samples": samples(generations.path, tok, c.generation.max_new_tokens, marker)}
            rows = diagnosis(records, list(arms), extra, args.control)
            text = table(rows, args.control)
            (out / "diagnose.md").write_text(text + "\n")
            (out / "diagnose.json").write_text(json.dumps(
                {"rows": [{k: dataclasses.asdict(v) if hasattr(v, "mde") else v for k, v in r.items()} for r in rows],
                 "arms": arms, "seeds": args.seeds, "control": args.control, "marker": marker,
                 "probe_prompts": len(probes), "wall_time_s": time.time() - start}, indent=1))
            console.echo("\n" + text)
            console.log(f"done in {console.duration(time.time() - start)}; {out / 'diagnose.md'}")
    return j.status


def diagnosis(records: list[dict], arms: list[str], extra: dict, control: str | None) -> list[dict]:
    """Per arm: the corpus's accuracy and its paired differences (`report.corpus_intervals`: to
    the unprojected corpus, and to `control`), the gold answer's log-probability and its paired
    difference, and the projection's bite and the samples' shape."""
    order = [a for a in arms if a != REFERENCE] + [REFERENCE]
    rows = {r["method"]: r for r in report.corpus_intervals(records, order, reference=REFERENCE)}
    if control:
        for r in report.corpus_intervals(records, order, reference=control):
            if f"vs_{control}" in r:
                rows[r["method"]][f"vs_{control}"] = r[f"vs_{control}"]
    gold = {arm: logprob_rows(extra[arm]["gold"]) for arm in order}
    out = []
    for arm in order:
        row = {**rows[arm], "arm": arm, "energy": extra[arm]["energy"], "samples": extra[arm]["samples"],
               "gold_logprob": mean_interval(gold[arm])}
        if arm != REFERENCE:
            row["gold_logprob_vs_unprojected"] = paired_difference(gold[arm], gold[REFERENCE])
        out.append(row)
    return out


if __name__ == "__main__":
    sys.exit(main(argv=None))
