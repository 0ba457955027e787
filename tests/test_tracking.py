"""W&B tracking, offline: the run lands in the run directory, and the command that uploads it is
one a shell reads whole, whatever the path."""

from __future__ import annotations

import shlex

from spd_ray.config import load_config
from spd_ray.tracking import Tracker


def test_the_offline_runs_sync_command_survives_a_path_with_spaces(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "my runs" / "a run"
    run_dir.mkdir(parents=True)
    tracker = Tracker(load_config(None, [f"run.output_dir={tmp_path / 'my runs'}", "run.name=a-run"]), run_dir)
    try:
        tracker.log({"stage1/calibration_loss": 1.0})
        where = tracker.where()
        command = where.split("`")[1]
        words = shlex.split(command)
        assert words[:2] == ["wandb", "sync"] and words[2].startswith(str(run_dir)) and len(words) == 3
    finally:
        tracker.finish()
