"""Rows a run writes and reads: stage 2's sampling rows and its corpus in part files, and content
fingerprints of text sets."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path


def fingerprint(texts: Sequence[str]) -> str:
    """A short content hash (recorded with artifacts to tell calibration sets apart)."""
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def sampling_rows(prompts: Sequence[str], n_samples: int, seed: int) -> list[dict]:
    """One row per (prompt, sample) with a stable id and its own sampling seed.

    The seed depends on the row alone, so a row samples the same text in any batch or replica.
    """
    rows = []
    for i, prompt in enumerate(prompts):
        for k in range(n_samples):
            row_seed = int.from_bytes(hashlib.sha256(f"{seed}/{i}/{k}".encode()).digest()[:4], "little")
            rows.append({"id": f"{i}-{k}", "prompt": prompt, "seed": row_seed})
    return rows


# Stage 2's corpus is written as it is generated: complete part files appear one by one (written
# aside, then renamed), so a kill loses at most the rows not yet in a part, and a rerun generates
# only the ids no part holds, with the same per-row seeds.
PART_GLOB = "part-*.parquet"


def written_ids(folder: Path) -> set[str]:
    """Ids of the rows in the complete part files of `folder` (leftover temp files removed)."""
    import pyarrow.parquet as pq

    for tmp in folder.glob(".part-*.tmp"):
        tmp.unlink()
    return {i for part in sorted(folder.glob(PART_GLOB)) for i in pq.read_table(part, columns=["id"])["id"].to_pylist()}


def write_parts(batches: Iterable, folder: Path, rows_per_part: int) -> int:
    """Write pyarrow batches (as they arrive) into part files of about `rows_per_part` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pending, n_pending, written = [], 0, 0

    def flush() -> None:
        nonlocal pending, n_pending, written
        name = f"part-{time.time_ns():x}-{uuid.uuid4().hex[:6]}.parquet"
        tmp = folder / f".{name}.tmp"
        pq.write_table(pa.concat_tables(pending), tmp)
        os.replace(tmp, folder / name)  # a part is there whole, or not at all
        written += n_pending
        pending, n_pending = [], 0

    for batch in batches:
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        pending.append(table)
        n_pending += table.num_rows
        if n_pending >= rows_per_part:
            flush()
    if n_pending:
        flush()
    return written


def read_corpus(folder: Path):
    """The rows of the complete part files of `folder` that train: all but those whose completion
    is empty or whitespace (the caller counts them; nothing else is dropped), as one pyarrow
    table, read where it is called: on the driver, which wrote the parts. The corpus is text,
    megabytes even for the paper's largest runs: it reads in a moment, where each Ray Data pass
    over the parts costs seconds of scheduling and worker start-up."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parts = sorted(folder.glob(PART_GLOB))
    if not parts:
        raise FileNotFoundError(f"no part files ({PART_GLOB}) in {folder}")
    table = pa.concat_tables([pq.read_table(part) for part in parts], promote_options="default")
    return table.filter(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(table["completion"])), 0))


def corpus_digest(folder: Path) -> str:
    """A digest of the rows of `folder`'s part files (id and completion, in id order): equal for
    two corpora with the same rows however they were split into parts."""
    import pyarrow.parquet as pq

    rows = sorted((i, c) for part in sorted(folder.glob(PART_GLOB))
                  for i, c in zip(*pq.read_table(part, columns=["id", "completion"]).to_pydict().values()))
    h = hashlib.sha256()
    for i, c in rows:
        h.update(f"{i}\0{c}\0".encode())
    return h.hexdigest()[:16]
