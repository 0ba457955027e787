"""The pre-registered verdicts of the study on the real model (PREREGISTRATION.md, beside this
file), from the runs' own artifacts:

    python results/real-smollm2/verdicts.py --h1 <diagnose folder> --h2 <comparison folder> [--out verdicts.json]

--h1: jobs/diagnose.py's output (`<run.output_dir>/<run.name>-diagnose`): each arm's and seed's
corpus.json (per row: correct or not). --h2: jobs/compare.py's experiment folder (records.json:
per method and seed, each evaluation item's correctness). Either may be left out (not run).

Every test is a paired difference on the same items (and seeds, drawn jointly), 2,000 bootstrap
replicates (spd_ray.stats), with the decision rule of PREREGISTRATION.md, "The decision rule".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from spd_ray.stats import MDE_FACTOR, bootstrap_p, holm, paired_replicates  # noqa: E402

MARGIN = 0.04  # the equivalence margin, pre-registered
ARMS_H1 = ["rank64", "rank32", "rank16", "activation", "random", "beta0.5"]  # secondary, vs unprojected
CONTROLS_H1 = [("spd_rank96", "activation"), ("spd_rank96", "random")]  # secondary contrasts
H2 = [("spd", "ssd"), ("spd", "psr"), ("spd", "base")]  # on math/test; spd - ssd is H2's primary
H4 = [("inference_only", "inference_activation"), ("inference_only", "base")]


def test(name: str, a: torch.Tensor, b: torch.Tensor) -> dict:
    """The paired difference a - b: point, 95% and 90% intervals, bootstrap p, MDE."""
    reps = paired_replicates(a, b)
    q = torch.quantile(reps, torch.tensor([0.025, 0.05, 0.95, 0.975], dtype=reps.dtype)).tolist()
    return {"test": name, "diff": float(a.mean() - b.mean()), "ci95": [q[0], q[3]], "ci90": [q[1], q[2]],
            "p": bootstrap_p(reps), "mde": MDE_FACTOR * float(reps.std()), "items": a.shape[1],
            "seeds": a.shape[0]}


def verdict(t: dict, p: float | None = None) -> str:
    """confirmed: above 0; refuted: below 0; equivalent: the 90% interval inside +-MARGIN;
    inconclusive otherwise. With `p` (Holm-adjusted), the direction needs p < 0.05 instead of
    the 95% interval's sign."""
    low, high = t["ci95"]
    above, below = (low > 0, high < 0) if p is None else (p < 0.05 and t["diff"] > 0, p < 0.05 and t["diff"] < 0)
    if above:
        return "confirmed"
    if below:
        return "refuted"
    if -MARGIN <= t["ci90"][0] and t["ci90"][1] <= MARGIN:
        return "equivalent"
    return "inconclusive"


def corpus_matrix(folder: Path, arm: str, seeds: list[int]) -> torch.Tensor:
    """Seeds x prompts, 0/1: each row's correctness in the arm's raw corpus (ids in order)."""
    rows = []
    for seed in seeds:
        correct = json.loads((folder / f"{arm}-s{seed}" / "corpus.json").read_text())["correct"]
        rows.append([correct[k] for k in sorted(correct, key=lambda k: tuple(map(int, k.split("-"))))])
    return torch.tensor(rows, dtype=torch.float64)


def h1(folder: Path) -> list[dict]:
    seeds = json.loads((folder / "diagnose.json").read_text())["seeds"]
    m = {arm: corpus_matrix(folder, arm, seeds)
         for arm in ["unprojected", "spd_rank96", *ARMS_H1]}
    primary = test("H1 spd_rank96 - unprojected (primary)", m["spd_rank96"], m["unprojected"])
    primary["verdict"] = verdict(primary)
    secondary = [test(f"H1 {arm} - unprojected", m[arm], m["unprojected"]) for arm in ARMS_H1]
    secondary += [test(f"H1 {a} - {b}", m[a], m[b]) for a, b in CONTROLS_H1]
    adjusted = holm({t["test"]: t["p"] for t in secondary})
    for t in secondary:
        t["p_holm"] = adjusted[t["test"]]
        t["verdict"] = verdict(t, t["p_holm"])
    return [primary, *secondary]


def eval_matrix(records: list[dict], method: str, split: str) -> torch.Tensor:
    rows = sorted((r for r in records if r["method"] == method and r["round"] == 1), key=lambda r: r["seed"])
    if not rows:
        raise KeyError(f"no records of method {method}")
    return torch.tensor([[int(c) for c in r["correct"][split]] for r in rows], dtype=torch.float64)


def h2_h4(folder: Path) -> list[dict]:
    records = json.loads((folder / "records.json").read_text())
    out = []
    for group, pairs in (("H2", H2), ("H4", H4)):
        for split in ("math/test", "math/transfer"):
            tests = []
            for a, b in pairs:
                ma, mb = eval_matrix(records, a, split), eval_matrix(records, b, split)
                if group == "H4":  # greedy evaluations without training: one seed is all of them
                    ma, mb = ma[:1], mb[:1]
                tests.append(test(f"{group} {a} - {b} on {split}", ma, mb))
            if split == "math/test":  # the pre-registered tests, Holm-adjusted within the group
                adjusted = holm({t["test"]: t["p"] for t in tests})
                for t in tests:
                    t["p_holm"] = adjusted[t["test"]]
                    t["verdict"] = verdict(t, t["p_holm"])
            out += tests
    return out


def markdown(tests: list[dict]) -> str:
    lines = ["| test | difference [95% interval] | 90% interval | p (Holm) | MDE | items x seeds | verdict |",
             "|---|---|---|---|---|---|---|"]
    for t in tests:
        p = f"{t['p']:.3f}" + (f" ({t['p_holm']:.3f})" if "p_holm" in t else "")
        lines.append(f"| {t['test']} | {t['diff']:+.3f} [{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}] | "
                     f"[{t['ci90'][0]:+.3f}, {t['ci90'][1]:+.3f}] | {p} | {t['mde']:.3f} | "
                     f"{t['items']} x {t['seeds']} | {t.get('verdict', 'descriptive')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--h1", type=Path, help="jobs/diagnose.py's output folder")
    ap.add_argument("--h2", type=Path, help="jobs/compare.py's experiment folder")
    ap.add_argument("--out", type=Path, help="where to write the tests as JSON")
    args = ap.parse_args(argv)
    tests = (h1(args.h1) if args.h1 else []) + (h2_h4(args.h2) if args.h2 else [])
    print(markdown(tests))
    if args.out:
        args.out.write_text(json.dumps(tests, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
