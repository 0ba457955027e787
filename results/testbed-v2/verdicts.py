"""The pre-registered decision rule (PREREGISTRATION.md) applied to the comparisons' intervals.

    python results/testbed-v2/verdicts.py runs/compare-testbed-v2 runs/compare-testbed-v2-loss

Reads each comparison's intervals.json (spd_ray/report.py, `interval_rows`) and prints one line
per pre-registered test: the difference, its 95% interval, the smallest detectable difference
and the verdict (confirmed: interval above 0; refuted: below 0; inconclusive: contains 0). A test
whose runs are missing is printed as "not run". Committed with the pre-registration, before any
comparison ran.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DOMAINS = ("math", "mcq", "code")


def tests() -> list[tuple[str, str, str, str, str]]:
    """(hypothesis, train domain, split, method, reference) of every pre-registered test."""
    out = [("H1", d, "corpus", "spd", "ssd") for d in DOMAINS]
    out += [("H2", d, f"{d}/test", "spd", ref) for d in DOMAINS for ref in ("ssd", "psr", "base")]
    out += [("H3", "code", "code/test", "spd", "spd_full_loss")]
    out += [("H4", "mcq", f"{d}/test", "spd", "ssd") for d in ("math", "code")]
    out += [("H5", d, f"{d}/test", "inference_only", "inference_random") for d in DOMAINS]
    return out


def verdict(low: float, high: float) -> str:
    return "confirmed" if low > 0 else "refuted" if high < 0 else "inconclusive"


def main(folders: list[str]) -> int:
    rows = [r for f in folders for r in json.loads((Path(f) / "intervals.json").read_text())]
    print("| test | trained on | metric | difference | 95% interval | MDE | verdict |")
    print("|---|---|---|---|---|---|---|")
    by_domain: dict[tuple[str, str], list[str]] = {}
    for hyp, domain, split, method, ref in tests():
        row = next((r for r in rows if (r["domain"], r["split"], r["method"]) == (domain, split, method)
                    and f"vs_{ref}" in r), None)
        name = f"{method} − {ref}"
        if row is None:
            print(f"| {hyp} {name} | {domain} | {split} | – | – | – | not run |")
            continue
        d = row[f"vs_{ref}"]
        v = verdict(d["low"], d["high"])
        by_domain.setdefault((hyp, domain), []).append(v)
        print(f"| {hyp} {name} | {domain} | {split} accuracy | {d['mean']:+.3f} | "
              f"[{d['low']:+.3f}, {d['high']:+.3f}] | {2.8 * d['se']:.3f} | {v} |")
    print()
    for domain in DOMAINS:  # H2 as a whole, per domain: all three confirmed, or any refuted
        vs = by_domain.get(("H2", domain))
        if vs and len(vs) == 3:
            whole = "confirmed" if all(v == "confirmed" for v in vs) else (
                "refuted" if "refuted" in vs else "inconclusive")
            print(f"H2 on {domain} as a whole: {whole}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
