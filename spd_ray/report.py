"""The comparison report: Markdown tables and PNG plots of a method comparison, plus subspace
diagnostics (spectra and principal angles between capability subspaces, computed by
spd_ray.core.subspace).

Records are one per (train domain, method, seed, round) run; metric keys are
`<domain>/<split>/<metric>` (e.g. `math/test/accuracy`, `code/transfer/nll`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import statistics
from pathlib import Path

import torch
from matplotlib.figure import Figure  # no pyplot: renders with Agg, leaves global state alone

from spd_ray.core.subspace import (
    CapabilitySubspace,
    chance_overlap,
    cumulative_energy,
    principal_angles,
    subspace_overlap,
)
from spd_ray.stats import Interval, as_matrix, mean_interval, paired_difference

DASH = "–"


# ---------------------------------------------------------------- subspace diagnostics


def compare_subspaces(subspaces: dict[str, CapabilitySubspace]) -> list[dict]:
    """One row per pair of named subspaces and (layer, kind) they share."""
    rows = []
    for (na, sa), (nb, sb) in itertools.combinations(subspaces.items(), 2):
        for layer, kind in sorted(sa.bases.keys() & sb.bases.keys()):
            a, b = sa.bases[(layer, kind)], sb.bases[(layer, kind)]
            if a.shape[0] != b.shape[0]:
                raise ValueError(
                    f"subspaces {na!r} and {nb!r} differ in kv_dim at layer {layer} {kind}: "
                    f"{a.shape[0]} vs {b.shape[0]} (different models?)"
                )
            angles = principal_angles(a, b)
            rows.append(dict(
                a=na, b=nb, layer=layer, kind=kind, rank_a=a.shape[1], rank_b=b.shape[1],
                overlap=subspace_overlap(a, b),
                chance=chance_overlap(a.shape[0], a.shape[1], b.shape[1]),
                mean_angle=float(angles.mean()), min_angle=float(angles.min()),
            ))
    return rows


# ---------------------------------------------------------------- aggregation over seeds


def summarize(records: list[dict], field: str = "metrics") -> list[dict]:
    """Mean and sample std over seeds per (domain, method, round, metric) of `record[field]`
    (`field="corpus"` aggregates corpus quality; records without it are skipped)."""
    groups: dict[tuple, list[tuple[int, float]]] = {}
    for r in records:
        for metric, value in (r.get(field) or {}).items():
            if isinstance(value, int | float):  # not the per-row correctness and digests
                key = (r["domain"], r["method"], r.get("round", 1), metric)
                groups.setdefault(key, []).append((r["seed"], float(value)))
    rows = []
    for (domain, method, rnd, metric), pairs in sorted(groups.items()):
        pairs.sort()
        values = [v for _, v in pairs]
        rows.append(dict(
            domain=domain, method=method, round=rnd, metric=metric,
            mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
            n=len(values), seeds=[s for s, _ in pairs], values=values,
        ))
    return rows


# ---------------------------------------------------------------- intervals over items and seeds


def _arm_rows(records: list[dict], field: str, key: str) -> dict[tuple[str, str], list[tuple[int, object]]]:
    """(train domain, method) -> [(seed, per-item correctness)] of `record[field][key]`, round 1
    only (the paper's protocol)."""
    out: dict[tuple[str, str], list[tuple[int, object]]] = {}
    for r in records:
        vals = r.get(field) or {}
        if r.get("round", 1) == 1 and vals.get(key) is not None:
            out.setdefault((r["domain"], r["method"]), []).append((r["seed"], vals[key]))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in out.items()}


def _corpus_matrix(rows: list[tuple[int, dict]]) -> torch.Tensor:
    ids = sorted(rows[0][1])
    return as_matrix([[c[i] for i in ids] for _, c in rows])


def interval_rows(records: list[dict], methods_order: list[str]) -> list[dict]:
    """For each train domain, evaluation split and method: the accuracy with its 95% interval,
    and its paired difference to each other method (`vs_<method>`: same items; same seeds where
    both have them), with the smallest difference the design detects. Then the same for the raw corpus
    against the unprojected SSD corpus (paper Table 3), with the share of rows whose text the
    projection changed (same prompts, same seeds)."""
    out = []
    splits = sorted({k for r in records for k in (r.get("correct") or {})}, key=lambda s: (s.split("/")[0], s))
    for split in splits:
        arms = _arm_rows(records, "correct", split)
        for domain in dict.fromkeys(d for d, _ in arms):
            mats = {m: as_matrix([c for _, c in arms[(domain, m)]]) for m in methods_order if (domain, m) in arms}
            for method, m in mats.items():
                row = dict(domain=domain, split=split, method=method, seeds=m.shape[0], items=m.shape[1],
                           accuracy=mean_interval(m))
                for ref in mats:
                    if ref != method:
                        row[f"vs_{ref}"] = paired_difference(m, mats[ref])
                out.append(row)
    return out + corpus_intervals(records, methods_order)


def corpus_intervals(records: list[dict], methods_order: list[str], reference: str = "ssd") -> list[dict]:
    """The raw corpus's accuracy per train domain and method with its 95% interval, and its
    paired difference to the `reference` method's corpus (the same prompts, seeds and sampling,
    no projection: paper Table 3), with the share of rows whose text the projection changed."""
    out = []
    arms, hashes = _arm_rows(records, "corpus", "correct"), _arm_rows(records, "corpus", "hashes")
    for domain in dict.fromkeys(d for d, _ in arms):
        if (domain, reference) not in arms:
            continue
        ref, ref_hash = _corpus_matrix(arms[(domain, reference)]), dict(hashes[(domain, reference)])
        for method in (m for m in methods_order if (domain, m) in arms):
            m = _corpus_matrix(arms[(domain, method)])
            row = dict(domain=domain, split="corpus", method=method, seeds=m.shape[0], items=m.shape[1],
                       accuracy=mean_interval(m))
            if method != reference and m.shape == ref.shape:
                row[f"vs_{reference}"] = paired_difference(m, ref)
                changed = [sum(h[i] != ref_hash[s].get(i) for i in h) / len(h)
                           for s, h in hashes[(domain, method)] if s in ref_hash]
                row["changed"] = sum(changed) / len(changed) if changed else None
            out.append(row)
    return out


def _ci(iv: Interval | None) -> str:
    return DASH if iv is None else str(iv)


def _intervals(rows: list[dict]) -> list[str]:
    """The interval tables, with the differences to the paper's references (base, ssd, psr);
    intervals.json has every pair."""
    if not rows:
        return []
    present = {r["method"] for r in rows}
    references = [m for m in ("base", "ssd", "psr") if m in present]
    lines = ["## Intervals (95%, bootstrap over items and seeds)", "",
             "Accuracy is the mean over seeds and items; Δ is the paired difference on the same "
             "items (seeds drawn jointly where both arms ran them). MDE: the smallest difference to "
             "SSD this design detects with 80% power (2.8 bootstrap standard errors). For the raw "
             "corpus, Δ is against the SSD corpus (the same prompts, seeds and sampling, no "
             "projection) and `changed` is the share of samples whose text the projection changed.", ""]
    for (domain, split) in dict.fromkeys((r["domain"], r["split"]) for r in rows):
        group = [r for r in rows if (r["domain"], r["split"]) == (domain, split)]
        lines += [f"### Trained on {domain}: {split}" if split != "corpus" else
                  f"### Trained on {domain}: raw corpus before training", ""]
        table = [[r["method"], str(r["seeds"]), str(r["items"]), _ci(r["accuracy"]),
                  *(_ci(r.get(f"vs_{ref}")) for ref in references),
                  _num(r["vs_ssd"].mde) if r.get("vs_ssd") else DASH,
                  _num(r.get("changed"))] for r in group]
        lines += _table(["method", "seeds", "items", "accuracy", *(f"Δ vs {ref}" for ref in references),
                         "MDE vs ssd", "changed"], table)
    return lines


# ---------------------------------------------------------------- formatting


def _cell(row: dict | None, digits: int = 3) -> str:
    return f"{row['mean']:.{digits}f} ± {row['std']:.{digits}f}" if row else DASH


def _num(x: float | None, fmt: str = ".3f") -> str:
    return DASH if x is None or math.isnan(x) else format(x, fmt)


def _label(metric: str) -> str:
    """`math/test/accuracy` -> `math test accuracy`, flagging the metrics where lower is better."""
    return metric.replace("/", " ") + (" (lower is better)" if metric.endswith("/nll") else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]


def comparison_table(evaluations: dict, reference: str | None = None) -> str:
    """Markdown: one row per evaluation metric (the first model's), one column per model, then
    the last model's delta to `reference` (default the first: SPD - base) with its paired 95%
    interval over the split's items (a bootstrap, `stats.paired_difference`) and the number of
    items n. Each evaluation is an `EvalResult` (`metrics`, and `correct`: each item's 0/1 by
    split); a missing value, or an interval no item-level result gives (NLL), is a dash."""
    models = list(evaluations)
    first, last = evaluations[reference or models[0]], evaluations[models[-1]]
    rows = []
    for key in first.metrics:
        vals = [evaluations[m].metrics.get(key) for m in models]
        ref = first.metrics.get(key)
        delta = None if None in (ref, vals[-1]) or len(models) < 2 else vals[-1] - ref
        split, _, kind = key.rpartition("/")
        a, b = last.correct.get(split), first.correct.get(split)
        paired = kind == "accuracy" and a is not None and b is not None and len(a) == len(b)
        interval = paired_difference(as_matrix([a]), as_matrix([b])) if paired and delta is not None else None
        shown = DASH if delta is None else f"{delta:+.3f}" + (
            f" [{interval.low:+.3f}, {interval.high:+.3f}]" if interval else "")
        rows.append([key, *map(_num, vals), shown, str(len(b)) if kind == "accuracy" and b else DASH])
    delta = "delta [95% interval]" if reference in (None, models[0]) else f"delta to {reference} [95% interval]"
    return "\n".join(_table(["metric", *models, delta, "n"], rows))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _is_test(metric: str) -> bool:
    return metric.split("/")[1:2] == ["test"]


def _metric_order(metric: str) -> tuple:
    # test split first (the in-domain benchmark), then the rest alphabetically
    return (not _is_test(metric), metric)


# ---------------------------------------------------------------- plots


def _own_spectra(sub: CapabilitySubspace) -> dict[tuple[int, str], torch.Tensor]:
    # a random basis (energy NaN) carries the gradient spectrum of another subspace, not its own
    return {k: s for k, s in sub.singular_values.items() if not math.isnan(sub.energy.get(k, 0.0))}


def _plot_spectrum(path: Path, name: str, sub: CapabilitySubspace,
                   spectra: dict[tuple[int, str], torch.Tensor]) -> None:
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for key, s in sorted(spectra.items()):
        cum = cumulative_energy(s.to(torch.float64) ** 2).tolist()
        (line,) = ax.plot(range(1, len(cum) + 1), cum, label=f"layer {key[0]} {key[1]}")
        if key in sub.bases:  # mark the kept rank
            r = sub.bases[key].shape[1]
            ax.plot([r], [cum[r - 1]], "o", color=line.get_color())
    ax.set(xlabel="rank", ylabel="cumulative energy (S² / total)", ylim=(0, 1.02),
           title=f"gradient spectrum: {name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)


def _plot_overlaps(path: Path, names: list[str], keys: list[tuple], rows: list[dict]) -> None:
    ncols = min(4, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    size = 1.2 + 0.6 * len(names)
    fig = Figure(figsize=(size * ncols + 1, size * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    idx = {n: i for i, n in enumerate(names)}
    for ax, key in zip(axes, keys):
        m = [[1.0 if i == j else math.nan for j in range(len(names))] for i in range(len(names))]
        for r in rows:
            if (r["layer"], r["kind"]) == key:
                m[idx[r["a"]]][idx[r["b"]]] = m[idx[r["b"]]][idx[r["a"]]] = r["overlap"]
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        for i, j in itertools.product(range(len(names)), repeat=2):
            if not math.isnan(m[i][j]):
                ax.text(j, i, f"{m[i][j]:.2f}", ha="center", va="center", fontsize=7,
                        color="k" if m[i][j] > 0.6 else "w")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(f"layer {key[0]} {key[1]}", fontsize=9)
    for ax in axes[len(keys):]:
        ax.set_axis_off()
    fig.colorbar(im, ax=axes.tolist(), label="overlap (mean cos²)")
    fig.savefig(path, dpi=100)


def _plot_bars(path: Path, domain: str, methods: list[str], metrics: list[str],
               cells: list[list[dict | None]]) -> None:
    fig = Figure(figsize=(1.5 + 1.2 * len(metrics) * max(1, len(methods)) / 3, 4),
                 layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(methods)
    for i, (method, rows) in enumerate(zip(methods, cells)):
        ax.bar([j + (i - (len(methods) - 1) / 2) * width for j in range(len(metrics))],
               [r["mean"] if r else math.nan for r in rows], width,
               yerr=[r["std"] if r else 0.0 for r in rows], capsize=3, label=method)
    ax.set_xticks(range(len(metrics)), [_label(m.removeprefix(f"{domain}/")) for m in metrics],
                  fontsize=8)
    ax.set(title=f"trained on {domain} (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------- the report


class _Results:
    """The seed-aggregated metrics of the records, looked up as the report's tables need them."""

    def __init__(self, records: list[dict], methods_order: list[str]):
        self.stats = {(r["domain"], r["method"], r["round"], r["metric"]): r
                      for r in summarize(records)}
        self.methods_order = methods_order
        self.domains = list(dict.fromkeys(r["domain"] for r in records))
        self.rounds = {dm: sorted({k[2] for k in self.stats if k[:2] == dm})
                       for dm in {k[:2] for k in self.stats}}

    def present(self, domain: str) -> list[str]:
        """The listed methods that ran on `domain`, in the listed order."""
        return [m for m in self.methods_order if (domain, m) in self.rounds]

    def cell(self, domain: str, method: str, metric: str | None,
             rnd: int | None = None) -> dict | None:
        # the main tables use each method's first round (the paper's one-round protocol)
        rs = self.rounds.get((domain, method))
        if not rs:
            return None
        return self.stats.get((domain, method, rs[0] if rnd is None else rnd, metric))

    def own(self, domain: str) -> list[str]:
        """The metrics of `domain`'s own benchmarks, test split first."""
        return sorted({k[3] for k in self.stats
                       if k[0] == domain and k[3].startswith(f"{domain}/")}, key=_metric_order)

    def ood(self, domain: str) -> list[str]:
        """The other domains' metrics of the runs trained on `domain`, by domain."""
        return sorted({k[3] for k in self.stats
                       if k[0] == domain and not k[3].startswith(f"{domain}/")},
                      key=lambda m: (m.split("/")[0], _metric_order(m)))


def _main_results(res: _Results, baseline: str) -> list[str]:
    lines = ["## Main results (in-domain and transfer)", ""]
    for domain in res.domains:
        metrics = res.own(domain)
        test = next((m for m in metrics if _is_test(m)), None)
        base = res.cell(domain, baseline, test)
        rows = []
        for method in res.present(domain):
            cells = [res.cell(domain, method, m) for m in metrics]
            row = res.cell(domain, method, test)
            delta = _num(row["mean"] - base["mean"], "+.3f") if row and base else DASH
            seeds = max((c["n"] for c in cells if c), default=DASH)
            rows.append([method, str(seeds), *map(_cell, cells), delta])
        lines += [f"### Trained on {domain}", ""]
        lines += _table(["method", "seeds", *map(_label, metrics), f"Δ vs {baseline}"], rows)
    return lines


def _out_of_domain(res: _Results) -> list[str]:
    ood = {d: res.ood(d) for d in res.domains}
    if not any(ood.values()):
        return []
    lines = ["## Out-of-domain (other domains' benchmarks)", ""]
    for domain in (d for d in res.domains if ood[d]):
        rows = [[m] + [_cell(res.cell(domain, m, k)) for k in ood[domain]]
                for m in res.present(domain)]
        lines += [f"### Trained on {domain}", ""]
        lines += _table(["method", *map(_label, ood[domain])], rows)
    return lines


def _corpus_quality(records: list[dict], domains: list[str], methods_order: list[str]) -> list[str]:
    listed = [r for r in records if r["method"] in methods_order]
    corpus = {(r["domain"], r["method"], r["round"], r["metric"]): r
              for r in summarize(listed, "corpus")}
    if not corpus:
        return []
    lines = ["## Corpus quality before training (self-generated, paper Table 3)", "",
             "Accuracy of the generated training completions, and their mean length in "
             "characters (mean ± std over seeds).", ""]
    cdomains = [d for d in domains if any(k[0] == d for k in corpus)]
    keys = [(m, rnd) for m in methods_order for rnd in sorted({k[2] for k in corpus if k[1] == m})]
    multi = len({k[1] for k in keys}) > 1
    rows = []
    for method, rnd in keys:
        row = [f"{method}, round {rnd}" if multi else method]
        for d in cdomains:
            row += [_cell(corpus.get((d, method, rnd, "accuracy"))),
                    _cell(corpus.get((d, method, rnd, "mean_chars")), 1)]
        rows.append(row)
    return lines + _table(
        ["method", *(f"{d} {c}" for d in cdomains for c in ("accuracy", "chars"))], rows)


def _rounds(res: _Results) -> list[str]:
    if not any(k[2] > 1 for k in res.stats):
        return []
    lines = ["## Rounds (iterated self-distillation)", ""]
    for domain in res.domains:
        metrics = res.own(domain)
        rows = [[m, str(rnd)] + [_cell(res.cell(domain, m, k, rnd)) for k in metrics]
                for m in res.present(domain) for rnd in res.rounds[(domain, m)]]
        lines += [f"### Trained on {domain}", ""]
        lines += _table(["method", "round", *map(_label, metrics)], rows)
    return lines


def _spectra(out: Path, subspaces: dict[str, CapabilitySubspace]) -> list[str]:
    lines = ["## Capability subspace spectra", "",
             "Energy: the fraction of the gradient energy (sum S²) in the kept rank.", ""]
    for name, sub in subspaces.items():
        rows = [[str(layer), kind, str(b.shape[0]), str(b.shape[1]),
                 _num(sub.energy.get((layer, kind)))]
                for (layer, kind), b in sorted(sub.bases.items())]
        lines += [f"### {name}", ""]
        lines += _table(["layer", "kind", "kv_dim", "rank", "energy captured"], rows)
        spectra = _own_spectra(sub)
        if spectra:
            png = f"spectrum_{_slug(name)}.png"
            _plot_spectrum(out / png, name, sub, spectra)
            lines += [f"![cumulative energy vs rank: {name}]({png})", ""]
    return lines


def _bites(bites: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    if not bites:
        return []
    lines = ["## How much the projection removes", "",
             "Share of the K/V activations' energy (k_proj / v_proj outputs, summed over the tokens "
             "of 128 training prompts of each domain) outside each subspace: what projecting onto "
             "it takes away. Near 0, the projection changes nothing.", ""]
    keys = sorted({k for per in bites.values() for e in per.values() for k in e})
    rows = [[name, domain, *(_num(e.get(k)) for k in keys)]
            for name, per in bites.items() for domain, e in per.items()]
    return lines + _table(["subspace", "prompts", *keys], rows)


def _principal_angles(out: Path, subspaces: dict[str, CapabilitySubspace]) -> list[str]:
    pairs = compare_subspaces(subspaces)
    if not pairs:
        return []
    lines = ["## Principal angles between subspaces", "",
             "Overlap = mean cos² of the principal angles (1 identical, 0 orthogonal); "
             "chance = the expected overlap of a random subspace, max(r_a, r_b) / kv_dim. "
             "Angles in degrees.", ""]
    rows = [[p["a"], p["b"], str(p["layer"]), p["kind"], str(p["rank_a"]), str(p["rank_b"]),
             _num(p["overlap"]), _num(p["chance"]), _num(p["mean_angle"], ".1f"),
             _num(p["min_angle"], ".1f")] for p in pairs]
    lines += _table(["a", "b", "layer", "kind", "rank a", "rank b", "overlap", "chance",
                     "mean angle", "min angle"], rows)
    keys = sorted({(p["layer"], p["kind"]) for p in pairs})
    _plot_overlaps(out / "subspace_overlap.png", list(subspaces), keys, pairs)
    return lines + ["![subspace overlap heatmaps](subspace_overlap.png)", ""]


def _bar_plots(out: Path, res: _Results) -> list[str]:
    bars = [(d, res.present(d), res.own(d)) for d in res.domains if res.present(d) and res.own(d)]
    if not bars:
        return []
    lines = ["## In-domain results (plots)", ""]
    for domain, methods, metrics in bars:
        png = f"bars_{_slug(domain)}.png"
        cells = [[res.cell(domain, m, k) for k in metrics] for m in methods]
        _plot_bars(out / png, domain, methods, metrics, cells)
        lines += [f"![trained on {domain}]({png})", ""]
    return lines


def write_report(
    out_dir: str | Path,
    records: list[dict],
    *,
    methods_order: list[str],
    subspaces: dict[str, CapabilitySubspace] | None = None,
    header: str = "",
    baseline: str = "base",
    bites: dict[str, dict[str, dict[str, float]]] | None = None,
) -> Path:
    """Write `out_dir/report.md` and its PNGs; returns the report path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = _Results(records, methods_order)
    lines = [header.rstrip(), ""] if header else []
    lines += _main_results(res, baseline)
    lines += _out_of_domain(res)
    lines += _corpus_quality(records, res.domains, methods_order)
    intervals = interval_rows(records, methods_order)
    lines += _intervals(intervals)
    (out / "intervals.json").write_text(json.dumps(
        [{k: dataclasses.asdict(v) if isinstance(v, Interval) else v for k, v in r.items()} for r in intervals],
        indent=1))
    lines += _rounds(res)
    if subspaces:
        lines += _spectra(out, subspaces) + _principal_angles(out, subspaces)
    lines += _bites(bites or {})
    lines += _bar_plots(out, res)
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")  # ±, – and Δ whatever the locale
    return path
