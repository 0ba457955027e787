"""The worked example of a capability from files (configs/examples/units.yaml): its files are what
its generator writes, and the task loads, labels and checks as shipped."""

import importlib.util
from pathlib import Path

import pyarrow.parquet as pq

from jobs import check_task

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "configs" / "examples" / "units"


def test_the_shipped_files_are_what_the_generator_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_data", EXAMPLE / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    make_data.main(["--out", str(tmp_path)])
    for name in ("calibration.jsonl", "test.jsonl", "transfer.csv"):
        assert (tmp_path / name).read_text() == (EXAMPLE / name).read_text(), name
    assert pq.read_table(tmp_path / "train.parquet").equals(pq.read_table(EXAMPLE / "train.parquet"))


def test_the_example_task_loads_and_labels_every_calibration_example(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # its paths are relative to the repository root, as `ray job submit --working-dir .`
    assert check_task.main(["--config", "configs/examples/units.yaml"]) == 0
    out = capsys.readouterr().out
    assert r"calibration labels (regex '= (\d+)', last match): 40 of 40 examples labeled" in out
    assert "units/transfer      60 rows  scorer regex  from configs/examples/units/transfer.csv" in out
    assert "Answer: 10 * 5 = ⟦50⟧." in out  # the converted number, and nothing else, is labeled
