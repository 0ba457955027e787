"""Inputs that used to lose data or fail late: each is an `error:` line and exit status 2 from
jobs/spd.py, before any Ray work, with nothing written outside the output folder (nor in it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from jobs import spd

from .test_files import CAL, TEST, TRAIN, config, datasets_cache  # noqa: F401 (the fixture)

# no code to score: the sandbox check is not what these tests are about
MATH_ONLY = "evaluation.domains=[math]"


@pytest.fixture
def parent(tmp_path) -> Path:
    """The folder above the output folder, holding a config.yaml of someone else's."""
    folder = tmp_path / "parent"
    folder.mkdir()
    (folder / "config.yaml").write_text("mine: true\n")
    return folder


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def fails(capfd, args: list[str], where: Path, console: list[str] | None = None) -> str:
    """jobs/spd.py's stderr for `args`, asserted to be one error and exit status 2, with no
    Ray started, no output of `datasets` and `where` (which holds the output folder) as it was;
    its console lines (stdout) go into `console`."""
    before = snapshot(where)
    status = spd.main(args)
    out, err = capfd.readouterr()
    assert status == 2, out + err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert "Generating" not in out + err  # datasets' bar of a file's first read
    assert not ray.is_initialized()
    assert snapshot(where) == before
    if console is not None:
        console.extend(out.splitlines())
    return err


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "/abs", ".", "two words"])
def test_a_run_name_is_one_folder_name(capfd, parent, name):
    err = fails(capfd, [MATH_ONLY, f"run.output_dir={parent / 'out'}", f"run.name={name}"],
                parent.parent)
    assert f"error: run.name={name!r}: it names one folder in run.output_dir, so it may hold " \
           "only letters, digits, '.', '_' and '-' (and is not . or ..)" in err
    assert (parent / "config.yaml").read_text() == "mine: true\n"


@pytest.mark.parametrize("make, output_dir, words", [
    (lambda p: (p / "out").write_text("x"), "{p}/out", "is a file, not a folder"),
    (lambda p: (p / "f").write_text("x"), "{p}/f/runs", "cannot be created or written in "
                                                         "(NotADirectoryError"),
    (None, "/proc/spd-ray-test/runs", "cannot be created or written in"),
    (None, "/proc/self", "cannot be created or written in"),  # a folder, not writable
])
def test_an_output_dir_that_cannot_be_written_is_named_with_the_fix(capfd, parent, make,
                                                                    output_dir, words):
    if make:
        make(parent)
    output_dir = output_dir.format(p=parent)
    err = fails(capfd, [MATH_ONLY, f"run.output_dir={output_dir}"], parent)
    assert f"error: run.output_dir={output_dir} " in err and words in err
    assert "set run.output_dir=<a folder you can write to> (it is created if missing)" in err


def test_the_output_dir_check_leaves_no_folder_behind(capfd, parent):
    # it creates the folders to try them, then the next check fails: they are gone again
    err = fails(capfd, [MATH_ONLY, f"run.output_dir={parent}/a/b", "calibration.layers=[9]"],
                parent)
    assert "calibration.layers=[9]" in err and not (parent / "a").exists()


@pytest.mark.parametrize("text", ["", "\n# all defaults?\n   \n"])
def test_an_empty_config_file_is_an_error(capfd, parent, text):
    path = parent / "empty.yaml"
    path.write_text(text)
    err = fails(capfd, ["--config", str(path), f"run.output_dir={parent}/out"], parent)
    assert f"error: config file {path} is empty (or only comments); check the path, or save " \
           "the file" in err


@pytest.mark.parametrize("overrides, words", [
    (["finetune.offload_params=true", "finetune.zero_stage=2"],
     "finetune.offload_params=true needs finetune.zero_stage=3 (only ZeRO-3 partitions the "
     "parameters), not 2: set finetune.zero_stage=3 or finetune.offload_params=false"),
    (["finetune.offload_optimizer=true", "finetune.zero_stage=0"],
     "finetune.offload_optimizer=true needs finetune.zero_stage >= 1"),
    (["finetune.zero_stage=4"], "finetune.zero_stage=4 is not allowed; valid values: [0, 1, 2, 3]"),
    (["calibration.zero_stage=3", "calibration.gpus_per_worker=2"],
     "calibration.zero_stage=3 with calibration.gpus_per_worker=2.0: each rank uses exactly one"),
])
def test_deepspeed_settings_its_builders_refuse_are_refused_up_front(capfd, parent, overrides,
                                                                    words):
    err = fails(capfd, [MATH_ONLY, *overrides, f"run.output_dir={parent}/out"], parent)
    assert words in err


def test_a_missing_model_folder_names_the_key_and_the_fix(capfd, parent):
    err = fails(capfd, [MATH_ONLY, f"model.path={parent}/nomodel", f"run.output_dir={parent}/out"],
                parent)
    assert f"error: model.path={parent}/nomodel: no such folder; set model.path=<a local HF " \
           "folder> or a hub id (with the hub reachable: HF_HUB_OFFLINE=0)" in err


def files_task(folder: Path, **parts) -> Path:
    """A files task config (capability units, the tests of test_files) in `folder`."""
    config(folder, **parts)
    return folder / "task.yaml"


def test_a_bad_jsonl_line_is_named_by_its_line(capfd, parent):
    data = parent / "data"
    data.mkdir()
    path = files_task(data)
    lines = [json.dumps(row) for row in [*TRAIN, *TRAIN[:2]]]  # the ids of lines 5, 6 repeat 1, 2
    lines[4] = lines[4][:15]  # a truncated line 5
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    err = fails(capfd, ["--config", str(path), f"run.output_dir={parent}/out"], parent)
    assert f"error: {data}/train.jsonl (task.files.train): line 5 is not valid JSON (" in err
    assert "fix or remove that line" in err and "ArrowInvalid" not in err
    lines[4] = json.dumps(TRAIN[0])  # a blank line before it: the lines, not the records, count
    (data / "train.jsonl").write_text("\n".join(["", *lines]) + "\n")
    err = fails(capfd, ["--config", str(path), f"run.output_dir={parent}/out"], parent)
    assert "train.jsonl (task.files.train): line 2 and line 6 both have id 'p6'" in err


def test_a_files_task_short_of_rows_says_how_many_were_used_of_how_many_asked(capfd, parent):
    data = parent / "data"
    data.mkdir()
    path = files_task(data)
    # it ends before any Ray (every span cut off), with the label report in the error
    console: list[str] = []
    err = fails(capfd, ["--config", str(path), f"run.output_dir={parent}/out",
                        "task.n_train_prompts=3", "task.n_eval_splits={units/test: 5}",
                        "calibration.max_length=8"], parent, console)
    assert f"  {len(CAL)} examples used of the 50 asked (task.n_calibration): the data holds no " \
           "more" in err
    assert console == [  # a warning per part short of rows; train: 3 asked of 4
        f"warning: {data}/cal.jsonl (task.files.calibration): using all {len(CAL)} rows of the 50 "
        "asked (task.n_calibration): the file holds no more",
        f"warning: {data}/test.jsonl (task.files.eval.test): using all {len(TEST)} rows of the 5 "
        "asked (task.n_eval_splits['units/test']): the file holds no more"]


@pytest.mark.parametrize("text, words", [
    ("", "is empty (or only comments)"),
    ("name: ..\n", "error: name='..': it names one folder in output_dir"),
])
def test_a_comparison_with_a_bad_name_or_an_empty_file_fails_alike(capfd, parent, text, words):
    from jobs import compare

    path = parent / "compare.yaml"
    path.write_text(text + f"output_dir: {parent}/out\n" * bool(text))
    before = snapshot(parent.parent)
    assert compare.main(["--config", str(path)]) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: ") and words in err and "Traceback" not in err, err
    assert snapshot(parent.parent) == before


def test_rounds_below_zero_are_refused_and_zero_evaluates_the_base_model_only(capfd, parent):
    from spd_ray.checks import check_settings
    from spd_ray.config import load_config

    out = parent / "runs"
    err = fails(capfd, [f"run.output_dir={out}", "run.rounds=-1", MATH_ONLY], parent)
    assert "run.rounds=-1" in err and "0: evaluate the base model only" in err
    check_settings(load_config(None, ["run.rounds=0"]))  # accepted: pipeline.run_pipeline runs no round
