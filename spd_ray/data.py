"""Task data for a run: calibration examples, training prompts and evaluation splits."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from spd_ray.config import SPDConfig
from spd_ray.testbed import Item, make_split


@dataclass
class Task:
    calibration: list[Item]  # labeled: the only place answers are used
    train_items: list[Item]  # only their prompts reach generation and training; the answers
    #                          serve one diagnostic, the quality of the raw corpus (Table 3)
    eval_splits: dict[str, list[Item]]  # "math/test", "math/transfer", ...

    @property
    def train_prompts(self) -> list[str]:
        return [it.prompt for it in self.train_items]


def load_task(cfg: SPDConfig) -> Task:
    """The task's data from its source: the embedded testbed or the paper's benchmarks (hub)."""
    t = cfg.task
    sizes = {(d, s): t.n_eval_splits.get(f"{d}/{s}", t.n_eval)
             for d in cfg.evaluation.domains or [t.domain] for s in cfg.evaluation.splits}
    if t.source == "hub":
        from spd_ray import hub  # imports `datasets`: only runs that read the hub pay for it

        calibration, train = hub.calibration_and_train(t)
        splits = {f"{d}/{s}": hub.eval_split(t, d, s, n) for (d, s), n in sizes.items()}
    else:
        calibration = make_split(t.domain, "calibration", t.n_calibration, t.seed)
        train = make_split(t.domain, "train", t.n_train_prompts, t.seed)
        splits = {f"{d}/{s}": make_split(d, s, n, t.seed) for (d, s), n in sizes.items()}
    return Task(calibration=calibration, train_items=train, eval_splits=splits)


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
