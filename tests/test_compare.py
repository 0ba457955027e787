"""jobs/compare.py at a toy size: baselines, iterated SPD, shared artifacts and the report."""

import json
from pathlib import Path

import pytest
import yaml

from jobs import compare

from .test_pipeline import SMALL

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_comparison_runs_every_kind_of_method_and_writes_the_report(tmp_path):
    import ray

    spec = {
        "name": "toy", "output_dir": str(tmp_path), "base_config": "configs/testbed.yaml",
        "overrides": [*SMALL, "finetune.num_workers=1", "calibration.num_workers=1", "evaluation.domains=[math]",
                      "task.n_train_prompts=16", "generation.max_new_tokens=16"],  # the suite's budget
        "domains": ["math"], "seeds": [7], "subspace_domains": ["code"],
        "methods": [{"name": "base", "train": False},
                    {"name": "inference_only", "train": False, "overrides": ["evaluation.project=true"]},
                    {"name": "spd_iterated", "overrides": ["run.rounds=2"]}],
    }
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(spec))
    try:
        assert compare.main(["--config", str(tmp_path / "toy.yaml")]) == 0
    finally:
        ray.shutdown()
    exp = tmp_path / "toy"
    records = json.loads((exp / "records.json").read_text())
    assert [(r["method"], r["round"]) for r in records] == [
        ("base", 1), ("inference_only", 1), ("spd_iterated", 1), ("spd_iterated", 2)]
    base, projected = records[0]["metrics"], records[1]["metrics"]
    assert set(base) == set(projected)  # the same splits, evaluated with the projection on:
    assert len(list((exp / "store").glob("*/eval_projected.json"))) == 1  # its own artifact
    assert records[3]["corpus"]["n"] > 0 and records[0]["corpus"] is None
    assert len(list((exp / "store").glob("*/eval_base.json"))) == 1  # evaluated once, shared by all
    assert len(list((exp / "store").glob("*/subspace"))) == 3  # math rounds 1 and 2, code
    report = (exp / "report.md").read_text()
    assert "| spd_iterated |" in report and "Made by `python jobs/compare.py" in report
    assert "| math | code |" in report and "math/round2" in report  # angles between domains and rounds
    assert list(exp.glob("*.png"))
    # intervals from each item's correctness, paired on the same items
    assert len(records[0]["correct"]["math/test"]) == len(records[3]["correct"]["math/test"]) > 0
    intervals = json.loads((exp / "intervals.json").read_text())
    spd = next(r for r in intervals if r["method"] == "spd_iterated" and r["split"] == "math/test")
    assert spd["vs_base"]["low"] <= spd["vs_base"]["mean"] <= spd["vs_base"]["high"]
    assert "## Intervals (95%, bootstrap over items and seeds)" in report
    assert "## How much the projection removes" in report and "| code | math |" in report  # the code subspace on math prompts
    assert (exp / "wandb_id").exists() and list((exp / "wandb").glob("offline-run-*"))  # the summary run


def test_a_bad_method_override_fails_before_anything_runs(tmp_path):
    spec = {"name": "bad", "output_dir": str(tmp_path), "methods": [{"name": "x", "overrides": ["subspace.rnak=3"]}]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    assert compare.main(["--config", str(tmp_path / "bad.yaml")]) == 2
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "compare").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_comparison_configs_resolve_every_run(path):
    from spd_ray.config import load_compare_config

    cc = load_compare_config(path)
    runs = [compare.run_config(cc, d, m, s) for d in cc.domains for m in cc.methods for s in cc.seeds]
    assert len({c.run.name for c in runs}) == len(runs) == len(cc.domains) * len(cc.methods) * len(cc.seeds)
    assert all(c.task.domain in cc.domains for c in runs)
    psr = [c for c in runs if c.run.name.split("-")[1] == "psr"]
    assert all(not c.generation.project and c.generation.top_p == 1.0 for c in psr)
    if path.stem not in ("testbed-rank", "testbed-v2-loss"):  # inference-only / the loss ablation alone
        assert psr


def test_experiments_share_a_store_only_when_they_name_it(tmp_path):
    from spd_ray.config import load_compare_config

    own = load_compare_config(ROOT / "configs/compare/testbed.yaml", [f"output_dir={tmp_path}"])
    why = load_compare_config(ROOT / "configs/compare/testbed-why.yaml", [f"output_dir={tmp_path}"])
    assert compare.store_dir(own) == compare.store_dir(why) == tmp_path.resolve() / "compare-testbed" / "store"
    rank = load_compare_config(ROOT / "configs/compare/testbed-rank.yaml", [f"output_dir={tmp_path}"])
    assert compare.store_dir(rank) == tmp_path.resolve() / "compare-testbed-rank" / "store"
    elsewhere = load_compare_config(ROOT / "configs/compare/testbed-why.yaml", [f"store={tmp_path / 's'}"])
    assert compare.store_dir(elsewhere) == tmp_path.resolve() / "s"  # absolute paths are kept
