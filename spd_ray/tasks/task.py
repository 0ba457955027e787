"""A run's task: calibration examples, training prompts and evaluation splits, from the
embedded testbed or the paper's benchmarks on the hub."""

from __future__ import annotations

from dataclasses import dataclass

from spd_ray.config import SPDConfig
from spd_ray.tasks.item import Item
from spd_ray.tasks.testbed import make_split


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
        from spd_ray.tasks import hub  # imports `datasets`: only runs that read the hub pay for it

        calibration, train = hub.calibration_and_train(t)
        splits = {f"{d}/{s}": hub.eval_split(t, d, s, n) for (d, s), n in sizes.items()}
    else:
        calibration = make_split(t.domain, "calibration", t.n_calibration, t.seed)
        train = make_split(t.domain, "train", t.n_train_prompts, t.seed)
        splits = {f"{d}/{s}": make_split(d, s, n, t.seed) for (d, s), n in sizes.items()}
    return Task(calibration=calibration, train_items=train, eval_splits=splits)
