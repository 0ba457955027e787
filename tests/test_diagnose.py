"""jobs/diagnose.py: the Table 3 check refuses what it cannot score before any Ray work."""

from pathlib import Path

import pytest

from jobs import diagnose

ROOT = Path(__file__).resolve().parents[1]


def test_prompts_without_answers_are_refused_before_any_work(tmp_path, capsys):
    code = diagnose.main(["--config", str(ROOT / "configs/examples/units.yaml"), f"run.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "come without answers" in err and "no corpus can be scored" in err
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


def test_bad_seed_list_or_override_is_a_clear_error(tmp_path, capsys):
    assert diagnose.main([f"run.output_dir={tmp_path}", "generation.temprature=0.3"]) == 2
    assert "temprature" in capsys.readouterr().err


def test_the_check_scores_both_corpora_on_the_same_prompts_and_seeds(local_ray, tmp_path):
    import json

    small = ["task.n_calibration=16", "task.n_train_prompts=12", "generation.max_new_tokens=24",
             "calibration.num_workers=1", "generation.replicas_max=1", f"run.output_dir={tmp_path}"]
    assert diagnose.main(["--seeds", "3", "4", "--energy-prompts", "8", *small]) == 0
    out = tmp_path / "testbed-diagnose"
    result = json.loads((out / "diagnose.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["projected"]["seeds"] == rows["unprojected"]["seeds"] == 2
    assert rows["projected"]["items"] == rows["unprojected"]["items"] == 12
    diff = rows["projected"]["vs_unprojected"]
    assert diff["mean"] == pytest.approx(rows["projected"]["accuracy"]["mean"] - rows["unprojected"]["accuracy"]["mean"])
    # a share of the rows (24 rows: at the testbed's ~5% it may be none on another machine)
    assert 0 <= rows["projected"]["changed"] <= 1
    assert set(result["energy_outside"]) == {"L5.k", "L5.v", "L3.k", "L3.v"}  # the paper's layers of 6
    assert all(0 < v < 1 for v in result["energy_outside"].values())
    assert len(list((out / "store").glob("*/subspace"))) == 1  # one stage 1 for all four arms
    assert "projected - unprojected:" in (out / "diagnose.md").read_text()
