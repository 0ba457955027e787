"""Writes the unit-conversion capability of configs/examples/units.yaml as plain data files: the
way a user brings a capability spd-ray does not ship ("Each of 4 weeks holds 7 days. How many
days are there?"). Deterministic: rerun it and the files are the same.

    python configs/examples/units/make_data.py [--out configs/examples/units]

calibration.jsonl  40 labeled examples: prompt, answer (the span is the converted number)
train.parquet      training prompts only (prompt column): SPD never sees their answers
test.jsonl         held-out conversions, same wording: prompt, gold
transfer.csv       the same held-out conversions in another wording: prompt, gold
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# (larger unit, smaller unit, how many of the smaller make one of the larger)
UNITS = [("weeks", "days", 7), ("yards", "feet", 3), ("gallons", "quarts", 4), ("dollars", "quarters", 4),
         ("pints", "cups", 2), ("nickels", "pennies", 5), ("hands", "fingers", 5), ("dozens", "eggs", 12),
         ("crates", "bottles", 6)]
AMOUNTS = range(2, 31)
N_CALIBRATION, N_TEST = 40, 60


def prompt(n: int, big: str, small: str, factor: int, transfer: bool) -> str:
    # the tiny testbed model has only seen arithmetic stories: each conversion states its factor
    if transfer:
        return f"Question: How many {small} are in {n} {big}, with {factor} {small} in each?\nAnswer:"
    return f"Question: Each of {n} {big} holds {factor} {small}. How many {small} are there?\nAnswer:"


def answer(n: int, factor: int) -> str:
    return f" {n} * {factor} = {n * factor}."


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    out = Path(ap.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    conversions = [(n, big, small, f) for big, small, f in UNITS for n in AMOUNTS]
    random.Random(0).shuffle(conversions)  # disjoint splits: no test conversion is calibrated or trained on
    calibration = conversions[:N_CALIBRATION]
    test = conversions[N_CALIBRATION:N_CALIBRATION + N_TEST]
    train = conversions[N_CALIBRATION + N_TEST:]
    with (out / "calibration.jsonl").open("w") as f:
        for i, (n, big, small, factor) in enumerate(calibration):
            row = {"id": f"cal-{i}", "prompt": prompt(n, big, small, factor, False), "answer": answer(n, factor)}
            f.write(json.dumps(row) + "\n")
    pq.write_table(pa.table({"id": [f"train-{i}" for i in range(len(train))],
                             "prompt": [prompt(*c, False) for c in train]}),
                   out / "train.parquet")
    with (out / "test.jsonl").open("w") as f:
        for i, (n, big, small, factor) in enumerate(test):
            f.write(json.dumps({"id": f"test-{i}", "prompt": prompt(n, big, small, factor, False), "gold": str(n * factor)}) + "\n")
    with (out / "transfer.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "prompt", "gold"])
        for i, (n, big, small, factor) in enumerate(test):
            writer.writerow([f"transfer-{i}", prompt(n, big, small, factor, True), str(n * factor)])
    print(f"wrote {len(calibration)} calibration, {len(train)} train, {len(test)} test and transfer rows to {out}")


if __name__ == "__main__":
    main()
