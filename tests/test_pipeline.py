"""The main job end to end on the embedded testbed, at a small size."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))
import spd  # noqa: E402

SMALL = ["task.n_calibration=16", "task.n_train_prompts=48", "task.n_eval=12",
         "generation.max_new_tokens=48", "evaluation.max_new_tokens=48", "finetune.epochs=1"]


@pytest.mark.slow
def test_main_job_runs_and_reuses_artifacts(tmp_path, capsys):
    args = [*SMALL, f"run.output_dir={tmp_path}", "run.name=small"]
    assert spd.main(args) == 0
    run = tmp_path / "small"
    for name in ("config.yaml", "manifest.json", "subspace/subspace.safetensors", "subspace/subspace.json",
                 "generations.parquet", "model/config.json", "eval_base.json", "eval_spd.json",
                 "metrics.json", "results.md"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["base"]) == set(metrics["spd"]) and "math/transfer/accuracy" in metrics["base"]
    meta = json.loads((run / "subspace/subspace.json").read_text())
    assert meta["meta"]["layers"] == [3, 2]  # the paper's [L-1, L//2] for the 4-layer model
    AutoModelForCausalLM.from_pretrained(run / "model")  # a plain HF folder
    assert "| math/test/accuracy |" in capsys.readouterr().out

    # a rerun with the same config redoes nothing; a changed fine-tuning recipe redoes stage 3 on
    assert spd.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("reusing") == 5
    assert spd.main([*args, "finetune.lr=2e-4"]) == 0
    out = capsys.readouterr().out
    assert "subspace: reusing" in out and "generations: reusing" in out and "model: reusing" not in out


def test_bad_config_is_a_clear_error_and_nothing_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/spd.py"), "subspace.rnak=3",
                           f"run.output_dir={tmp_path}"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown config key subspace.rnak" in proc.stderr and "rank_mode" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_missing_model_path_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/spd.py"), f"model.path={tmp_path}/nomodel",
                           f"run.output_dir={tmp_path}"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "nomodel" in proc.stderr
