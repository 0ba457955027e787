"""The comparison report: subspace angles, aggregation over seeds, and the Markdown + PNG output."""

from __future__ import annotations

import math
import re

import pytest
import torch

from spd_ray.core.subspace import (
    CapabilitySubspace,
    chance_overlap,
    principal_angles,
    random_subspace,
    subspace_overlap,
)
from spd_ray.report import DASH, compare_subspaces, comparison_table, summarize, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def orthonormal(d: int, r: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(seed)))
    return q


def test_identical_and_orthogonal_subspaces():
    a = orthonormal(16, 4, 0)
    torch.testing.assert_close(principal_angles(a, a), torch.zeros(4, dtype=torch.float64),
                               atol=1e-4, rtol=0)
    assert subspace_overlap(a, a) == pytest.approx(1.0)
    eye = torch.eye(16)
    angles = principal_angles(eye[:, :4], eye[:, 4:10])
    assert angles.shape == (4,)
    torch.testing.assert_close(angles, torch.full((4,), 90.0, dtype=torch.float64))
    assert subspace_overlap(eye[:, :4], eye[:, 4:10]) == 0.0


def test_known_angles():
    c, s = math.cos(math.radians(60)), math.sin(math.radians(60))
    angles = principal_angles(torch.tensor([[1.0], [0.0]]), torch.tensor([[c], [s]]))
    assert angles.tolist() == pytest.approx([60.0])
    # span(e1, e2) vs span(e1, cos30 e2 + sin30 e3): angles 0 and 30, ascending
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [c, 0.0], [s, 0.0]])
    assert principal_angles(a, b).tolist() == pytest.approx([0.0, 30.0], abs=1e-4)
    assert subspace_overlap(a, b) == pytest.approx((1 + c**2) / 2)


def test_random_subspaces_overlap_at_chance():
    d, r1, r2 = 200, 10, 20
    overlaps = [subspace_overlap(orthonormal(d, r1, i), orthonormal(d, r2, 100 + i))
                for i in range(20)]
    assert sum(overlaps) / len(overlaps) == pytest.approx(chance_overlap(d, r1, r2), abs=0.02)


def subspace(seed: int, d: int = 16, r: int = 8) -> CapabilitySubspace:
    keys = [(1, "k"), (1, "v"), (3, "k"), (3, "v")]
    return CapabilitySubspace(
        {key: orthonormal(d, r, seed + i) for i, key in enumerate(keys)},
        {key: torch.logspace(0, -2, d) for key in keys},
        {key: 0.9 for key in keys},
        {"task": "math"},
    )


def test_compare_subspaces_rows():
    cal = subspace(0)
    subs = {"cal": cal, "same": cal, "random": random_subspace(cal, seed=1)}
    rows = compare_subspaces(subs)
    assert len(rows) == 3 * 4
    same = [r for r in rows if (r["a"], r["b"]) == ("cal", "same")]
    assert all(r["overlap"] == pytest.approx(1.0) and r["min_angle"] < 1e-3 for r in same)
    r = rows[0]
    assert set(r) == {"a", "b", "layer", "kind", "rank_a", "rank_b", "overlap", "chance",
                      "mean_angle", "min_angle"}
    assert r["chance"] == 0.5 and r["rank_a"] == 8


def rec(domain, method, seed, metrics, rnd=1, corpus=None):
    return {"domain": domain, "method": method, "seed": seed, "round": rnd, "metrics": metrics,
            "corpus": corpus}


RECORDS = [
    rec("math", "base", 0, {"math/test/accuracy": 0.5, "math/transfer/accuracy": 0.3}),
    rec("math", "base", 1, {"math/test/accuracy": 0.6, "math/transfer/accuracy": 0.5}),
    rec("math", "psr", 0, {"math/test/accuracy": 0.4}),  # transfer missing: shows "–"
    rec("math", "spd", 0, {"math/test/accuracy": 0.7, "math/transfer/accuracy": 0.6,
                           "code/transfer/nll": 0.15},
        corpus={"accuracy": 0.4, "mean_chars": 80.0, "n": 1000}),
    rec("math", "spd", 1, {"math/test/accuracy": 0.8, "math/transfer/accuracy": 0.6,
                           "code/transfer/nll": 0.25},
        corpus={"accuracy": 0.6, "mean_chars": 100.0, "n": 1000}),
    rec("math", "spd", 0, {"math/test/accuracy": 0.9}, rnd=2,
        corpus={"accuracy": 0.7, "mean_chars": 60.0, "n": 1000}),
    rec("code", "base", 0, {"code/test/accuracy": 0.2, "code/transfer/nll": 0.7}),
    rec("code", "unlisted", 0, {"code/test/accuracy": 0.9},
        corpus={"accuracy": 0.1, "mean_chars": 10.0, "n": 10}),
]


def test_summarize_mean_and_sample_std():
    rows = {(r["domain"], r["method"], r["round"], r["metric"]): r for r in summarize(RECORDS)}
    base = rows[("math", "base", 1, "math/test/accuracy")]
    assert base["mean"] == pytest.approx(0.55)
    assert base["std"] == pytest.approx(math.sqrt(0.005))  # ddof=1
    assert (base["n"], base["seeds"], base["values"]) == (2, [0, 1], [0.5, 0.6])
    one = rows[("math", "spd", 2, "math/test/accuracy")]
    assert (one["mean"], one["std"], one["n"]) == (0.9, 0.0, 1)
    assert ("math", "psr", 1, "math/transfer/accuracy") not in rows
    corpus = {(r["method"], r["round"], r["metric"]): r for r in summarize(RECORDS, "corpus")}
    assert corpus[("spd", 1, "mean_chars")]["mean"] == pytest.approx(90.0)
    assert ("base", 1, "accuracy") not in corpus


def section(text: str, title: str) -> str:
    """The text of the `## title` section, up to the next `## ` heading."""
    assert f"## {title}" in text, title
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def row(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def test_write_report(tmp_path):
    cal = subspace(0)
    path = write_report(tmp_path / "out", RECORDS, methods_order=["base", "psr", "ssd", "spd"],
                        subspaces={"cal": cal, "random": random_subspace(cal, seed=1)},
                        header="# SPD comparison\n\ncommand: `python jobs/compare.py`")
    text = path.read_text(encoding="utf-8")
    assert path == tmp_path / "out" / "report.md"
    assert text.startswith("# SPD comparison\n\ncommand: `python jobs/compare.py`")

    main = section(text, "Main results")
    math_table = main.split("### Trained on code")[0]
    assert "math test accuracy" in math_table and "| ssd |" not in math_table
    assert row(math_table, "| base |") == (
        "| base | 2 | 0.550 ± 0.071 | 0.400 ± 0.141 | +0.000 |")
    assert row(math_table, "| psr |") == "| psr | 1 | 0.400 ± 0.000 | – | -0.150 |"
    # the main table shows the first round; round 2 goes to the rounds table
    assert row(math_table, "| spd |") == "| spd | 2 | 0.750 ± 0.071 | 0.600 ± 0.000 | +0.200 |"
    assert "unlisted" not in text
    assert "code transfer nll (lower is better)" in main.split("### Trained on code")[1]

    ood = section(text, "Out-of-domain")
    assert "code transfer nll" in ood and row(ood, "| spd |") == "| spd | 0.200 ± 0.071 |"
    assert row(ood, "| base |") == "| base | – |"

    corpus = section(text, "Corpus quality")
    assert row(corpus, "| method |") == "| method | math accuracy | math chars |"
    assert row(corpus, "| spd, round 1 |") == "| spd, round 1 | 0.500 ± 0.141 | 90.0 ± 14.1 |"
    assert row(corpus, "| spd, round 2 |") == "| spd, round 2 | 0.700 ± 0.000 | 60.0 ± 0.0 |"
    assert "| base |" not in corpus

    rounds = section(text, "Rounds")
    assert "| spd | 2 | 0.900 ± 0.000 | – |" in rounds

    spectra = section(text, "Capability subspace spectra")
    assert "| 3 | v | 16 | 8 | 0.900 |" in spectra and "| 3 | v | 16 | 8 | – |" in spectra
    angles = section(text, "Principal angles")
    assert row(angles, "| cal | random | 1 | k |").split(" | ")[7] == "0.500"  # chance

    # no spectrum plot for the random basis: its singular values are those of `cal`
    assert "spectrum_random" not in text
    pngs = {"spectrum_cal.png", "subspace_overlap.png", "bars_math.png", "bars_code.png"}
    for name in pngs:
        assert f"]({name})" in text
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG_MAGIC


def test_write_report_without_optional_sections(tmp_path):
    path = write_report(tmp_path, RECORDS[:3], methods_order=["spd", "base"])
    text = path.read_text(encoding="utf-8")
    assert "## Main results" in text
    for title in ("Out-of-domain", "Corpus quality", "Rounds", "spectra", "Principal angles"):
        assert title not in text
    assert "| spd |" not in text
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["bars_math.png"]


def test_comparison_table_gives_each_delta_its_paired_interval_and_n():
    from spd_ray.stages.evaluate import EvalResult

    base = EvalResult({"math/test/accuracy": 0.25, "math/test/nll": 1.5}, {"math/test": "0001" * 25})
    spd = EvalResult({"math/test/accuracy": 0.5}, {"math/test": "0011" * 25})
    lines = comparison_table({"base": base, "spd": spd}).splitlines()
    assert lines[0] == "| metric | base | spd | delta [95% interval] | n |"
    accuracy = lines[2].split(" | ")
    assert accuracy[:3] == ["| math/test/accuracy", "0.250", "0.500"] and accuracy[-1] == "100 |"
    low, high = (float(x) for x in re.search(r"\[(\S+), (\S+)\]", accuracy[3]).groups())
    assert accuracy[3].startswith("+0.250") and 0.1 < low < 0.25 < high < 0.4  # 25 of 100 items flipped
    assert lines[3] == f"| math/test/nll | 1.500 | {DASH} | {DASH} | {DASH} |"
    same = comparison_table({"base": base, "spd": base}).splitlines()[2]
    assert "+0.000 [+0.000, +0.000]" in same


def test_the_delta_is_taken_to_the_reference_in_the_same_precision():
    from spd_ray.pipeline import PipelineResult, RoundResult
    from spd_ray.stages.evaluate import EvalResult

    base = EvalResult({"math/test/accuracy": 0.25}, {"math/test": "0001" * 25})
    base32 = EvalResult({"math/test/accuracy": 0.5}, {"math/test": "0011" * 25})
    spd = EvalResult({"math/test/accuracy": 0.5}, {"math/test": "0011" * 25})
    result = PipelineResult(base, [RoundResult(1, evaluation=spd, base_float32=base32)])
    assert result.reference() == "base_float32" and list(result.results()) == ["base", "base_float32", "spd"]
    lines = comparison_table(result.results(), result.reference()).splitlines()
    assert lines[0] == "| metric | base | base_float32 | spd | delta to base_float32 [95% interval] | n |"
    assert "| 0.250 | 0.500 | 0.500 | +0.000 [+0.000, +0.000] | 100 |" in lines[2]
    assert PipelineResult(base, [RoundResult(1, evaluation=spd)]).reference() == "base"
