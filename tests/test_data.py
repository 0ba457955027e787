"""Stage 2's corpus written as it is generated: complete parts only, and a rerun that goes on."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spd_ray.data import read_corpus, sampling_rows, write_parts, written_ids


def _batches(rows, size, calls, die_after=None):
    for i in range(0, len(rows), size):
        if die_after is not None and i >= die_after:
            raise KeyboardInterrupt  # the driver killed mid-stage
        chunk = rows[i : i + size]
        calls.extend(r["id"] for r in chunk)
        yield pa.RecordBatch.from_pylist([{**r, "completion": f"c{r['seed']}"} for r in chunk])


def test_a_killed_stage_keeps_its_parts_and_a_rerun_generates_only_the_rest(tmp_path):
    rows = sampling_rows([f"p{i}" for i in range(50)], 2, seed=7)
    calls: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        write_parts(_batches(rows, 8, calls, die_after=64), tmp_path, rows_per_part=16)
    (tmp_path / ".part-x.parquet.tmp").write_bytes(b"half a file")  # as a kill mid-write leaves
    done = written_ids(tmp_path)
    assert len(done) == 64 and not list(tmp_path.glob(".part-*"))  # whole parts only
    todo = [r for r in rows if r["id"] not in done]
    calls.clear()
    write_parts(_batches(todo, 8, calls), tmp_path, rows_per_part=16)
    assert len(calls) == 100 - 64  # nothing generated twice
    ids = [i for part in tmp_path.glob("part-*.parquet") for i in pq.read_table(part)["id"].to_pylist()]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # every id exactly once
    seeds = {r["id"]: r["seed"] for r in rows}  # the same per-row seeds on the rerun
    table = pa.concat_tables([pq.read_table(p) for p in tmp_path.glob("part-*.parquet")]).to_pylist()
    assert all(r["completion"] == f"c{seeds[r['id']]}" for r in table)


def test_the_corpus_is_every_complete_part_less_the_empty_completions(tmp_path):
    # empty, or whitespace only (Unicode's too): left out; any other text trains, spaces and all
    blank = ["", " \n", "\u00a0\u3000"]
    rows = [{**r, "completion": blank[i % 9 // 3] if i % 3 == 0 else f" c{i}\n"} for i, r in
            enumerate(sampling_rows([f"p{i}" for i in range(10)], 1, seed=7))]
    write_parts([pa.RecordBatch.from_pylist(rows[i : i + 4]) for i in range(0, 10, 4)], tmp_path, rows_per_part=4)
    (tmp_path / ".part-x.parquet.tmp").write_bytes(b"half a file")  # not a part: never read
    table = read_corpus(tmp_path)
    kept = sorted(f" c{i}\n" for i in range(10) if i % 3)  # as written, spaces and all
    assert sorted(table.column("completion").to_pylist()) == kept
    assert sorted(table.column("id").to_pylist()) == sorted(r["id"] for i, r in enumerate(rows) if i % 3)
    assert set(table.column_names) == set(rows[0]) and len(list(tmp_path.glob("part-*.parquet"))) == 3
    with pytest.raises(FileNotFoundError, match="no part files"):
        read_corpus(tmp_path / "nothing")
