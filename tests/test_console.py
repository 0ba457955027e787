"""The console: stage lines, progress bars that do not spew frames, warnings once, the driver log
that receives everything else, and --verbose that brings it back."""

import contextlib
import io
import json
import logging
import os
import re

import pytest

from jobs import spd
from spd_ray import artifacts, console
from spd_ray.config import load_config
from spd_ray.pipeline import PipelineResult, RoundResult
from spd_ray.stages.evaluate import EvalResult
from spd_ray.stages.finetune import training_step


def test_a_stage_prints_a_line_as_it_starts_and_one_as_it_ends(capsys):
    with console.session(), console.stage("stage 2", "self-generation of 32 completions") as st:
        st.summary = "32 completions kept"
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] stage 2: self-generation of 32 completions", out[0])
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] stage 2 done in 0 s: 32 completions kept", out[1])


def test_a_failing_stage_says_how_it_failed(capsys):
    with pytest.raises(RuntimeError), console.session(), console.stage("stage 3"):
        raise RuntimeError("no rows\nmore detail")
    assert "stage 3 failed after 0 s: RuntimeError: no rows" in capsys.readouterr().out


def test_a_bar_off_a_terminal_prints_its_final_state_only(capfd, tmp_path, monkeypatch):
    monkeypatch.setattr(console, "QUIET_UNDER_S", 0.0)
    with console.session():
        console.open_log(tmp_path / "driver.log")
        with console.progress("generating", 1000, unit="rows") as bar:
            for _ in range(1000):
                bar.update()
    out = capfd.readouterr().out
    assert "\r" not in out and "\x1b" not in out
    assert len(out.splitlines()) == 1 and "generating [####################] 1000/1000 rows in" in out


def test_a_bar_off_a_terminal_over_in_a_moment_leaves_no_line_but_in_the_log(capfd, tmp_path):
    with console.session():
        console.open_log(tmp_path / "driver.log")
        with console.progress("running programs", 8, unit="programs") as bar:
            bar.update(8)
    assert capfd.readouterr().out == ""
    assert "running programs [####################] 8/8 programs" in (tmp_path / "driver.log").read_text()


def test_a_long_bar_off_a_terminal_prints_at_most_three_milestones(capfd, monkeypatch):
    monkeypatch.setattr(console, "MILESTONE_AFTER_S", 0.0)
    monkeypatch.setattr(console, "QUIET_UNDER_S", 0.0)
    with console.session(), console.progress("training", 10, unit="steps") as bar:
        for step in range(1, 11):
            bar.set(step)
    with console.session(), console.progress("training", 10, unit="steps") as bar:
        bar.set(9)  # a jump past three milestones: one line
        bar.set(10)
    lines = capfd.readouterr().out.splitlines()
    assert [line.split("] ")[1].split()[0] for line in lines] == ["3/10", "5/10", "8/10", "10/10", "9/10", "10/10"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_on_a_terminal_is_redrawn_in_place_and_lines_go_above_it(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr("sys.stdout", term)
    monkeypatch.setattr(console, "_REDRAW_S", 0.0)
    with console.session(), console.progress("running programs", 4, unit="programs") as bar:
        bar.update(2)
        console.log("a line while the bar runs")
        bar.update(2)
    text = term.getvalue()
    assert text.count("\r\x1b[2K") >= 4  # drawn, redrawn, cleared for the line, cleared at the end
    lines = text.split("\n")
    assert "a line while the bar runs" in lines[0] and "running programs" in lines[1]
    assert lines[1].rsplit("\r\x1b[2K", 1)[1].startswith("  running programs [####################] 4/4")
    assert lines[-1] == ""  # nothing left drawn: the final state is a line of its own


def test_a_polled_bar_follows_its_reader():
    steps = iter([None, 2, 5])
    with console.session():
        bar = console.progress("training", 5).poll(lambda: next(steps, 5), every_s=0.01)
        for _ in range(500):
            if bar.done == 5:
                break
            bar.stopped.wait(0.01)
        bar.close()
    assert bar.done == 5


def test_a_repeated_warning_shows_once_and_the_log_keeps_each(capfd, tmp_path):
    with console.session():
        console.open_log(tmp_path / "driver.log")
        for _ in range(3):
            console.warn("stage 2: 3 of 32 completions are empty")
            logging.getLogger("spd_ray.tasks.sandbox").warning("evaluation.sandbox=process: %s", "no isolation")
    out = capfd.readouterr().out
    assert out.count("warning: stage 2: 3 of 32 completions are empty") == 1
    assert out.count("warning: evaluation.sandbox=process: no isolation") == 1
    logged = (tmp_path / "driver.log").read_text()
    assert logged.count("completions are empty") == 3 and logged.count("no isolation") == 3


def test_the_driver_log_receives_the_detail_and_the_console_only_its_lines(capfd, tmp_path):
    log = tmp_path / "logs" / "driver.log"
    with console.session():
        console.log("before the log opens")
        console.open_log(log)
        print("a library's chatter")
        os.write(2, b"C++ on descriptor 2\n")  # what Ray's core writes, below Python
        console.log("a stage line")
    out, err = capfd.readouterr()
    assert "before the log opens" in out and "a stage line" in out
    assert "chatter" not in out + err and "descriptor 2" not in out + err
    logged = log.read_text()
    assert all(s in logged for s in ("before the log opens", "a library's chatter", "C++ on descriptor 2",
                                     "a stage line"))
    print("after the session")  # the descriptors are back
    assert "after the session" in capfd.readouterr().out and "after the session" not in log.read_text()


def test_a_traceback_that_ends_the_session_is_in_the_driver_log(tmp_path):
    with pytest.raises(ZeroDivisionError), console.session():
        console.open_log(tmp_path / "driver.log")
        1 / 0  # noqa: B018
    assert "Traceback" in (tmp_path / "driver.log").read_text()


def test_verbose_leaves_the_detail_on_the_console(capfd, tmp_path):
    with console.session(verbose=True):
        console.open_log(tmp_path / "driver.log")
        print("a library's chatter")
        console.log("a stage line")
    out = capfd.readouterr().out
    assert "a library's chatter" in out and "a stage line" in out
    assert "a stage line" in (tmp_path / "driver.log").read_text()


def _fake_pipeline(cfg, task, run, tracker):
    print("Ray Data progress frame")
    console.log("a stage line")
    return PipelineResult(EvalResult({"math/test/accuracy": 0.5}),
                          [RoundResult(1, evaluation=EvalResult({"math/test/accuracy": 0.75}))])


@pytest.mark.parametrize("verbose", [False, True])
def test_the_job_sends_the_detail_to_its_driver_log_unless_verbose(capfd, tmp_path, monkeypatch, verbose):
    from spd_ray import job

    monkeypatch.setattr(job, "ray_session", lambda run: contextlib.nullcontext("/tmp/ray/session_x/logs"))
    monkeypatch.setattr(job, "preflight", lambda cfg: None)  # no cluster to check
    monkeypatch.setattr(spd, "run_pipeline", _fake_pipeline)
    args = [*(["--verbose"] if verbose else []), "evaluation.domains=[math]", "run.wandb.enabled=false",
            f"run.output_dir={tmp_path}", "run.name=v"]
    assert spd.main(args) == 0
    out = capfd.readouterr().out
    log = tmp_path / "v" / "logs" / "driver.log"
    assert "a stage line" in out and "| math/test/accuracy | 0.500 | 0.750 | +0.250" in out
    assert f"driver log {log}" in out and "Ray logs /tmp/ray/session_x/logs" in out
    assert ("Ray Data progress frame" in out) == verbose
    assert ("Ray Data progress frame" in log.read_text()) != verbose


def test_run_verbose_changes_no_artifact_key(tmp_path):
    quiet = load_config(None, [f"run.output_dir={tmp_path}"])
    loud = load_config(None, [f"run.output_dir={tmp_path}", "run.verbose=true"])
    run = artifacts.RunDir(quiet)
    assert all(run.key(name, quiet) == run.key(name, loud) for name in artifacts.DEPENDS_ON)


def test_training_progress_is_read_from_the_loop_or_else_from_the_last_checkpoint(tmp_path, capsys):
    train_dir, progress = tmp_path / "run-finetune", tmp_path / "progress.json"
    read = training_step(train_dir, progress)
    assert read() is None  # nothing yet
    train_dir.mkdir()
    (train_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"latest_checkpoint_result": {"metrics": {"step": 4, "total_steps": 9}}}))
    assert read() == 4
    progress.write_text(json.dumps({"step": 7, "total_steps": 9}))
    assert read() == 7 and "warning" not in capsys.readouterr().out
    progress.write_text(json.dumps({"step": 5, "total_steps": 9}))  # a restart from step 4's checkpoint
    assert read() == 5 and "training went back from step 7 to 5" in capsys.readouterr().out


def test_the_time_to_go_is_paced_from_the_first_news_not_the_start_up(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    with console.session():
        bar = console.progress("generating", 101, unit="rows")
        now[0] = 100.0  # the replicas took 100 s to load, then the first row came
        bar.set(1)
        now[0] = 110.0
        bar.set(11)
        assert bar.render().endswith("11/101 rows 1 min 50 s, 1 min 30 s to go")  # at 1 row/s, not 0.1
        bar.close()


def test_a_progress_file_caught_mid_write_is_no_news(tmp_path):
    progress = tmp_path / "progress.json"
    progress.write_text('{"step": ')
    assert training_step(tmp_path / "run-finetune", progress)() is None
