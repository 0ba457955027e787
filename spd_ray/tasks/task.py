"""A run's task: calibration examples, training prompts and evaluation splits, from the
embedded testbed, the paper's benchmarks on the hub or data files (any capability), in the prompt
format of the config."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from spd_ray.config import ConfigError, SPDConfig
from spd_ray.core.modeling import load_tokenizer
from spd_ray.tasks.evaluation import check_scorers
from spd_ray.tasks.item import Item
from spd_ray.tasks.testbed import make_split


@dataclass
class Task:
    calibration: list[Item]  # labeled: the only place answers are used
    train_items: list[Item]  # only their prompts reach generation and training; the answers
    #                          serve one diagnostic, the quality of the raw corpus (Table 3);
    #                          data files give no answers for them
    eval_splits: dict[str, list[Item]]  # "math/test", "math/transfer", ...

    @property
    def train_prompts(self) -> list[str]:
        return [it.prompt for it in self.train_items]

    def fingerprints(self) -> dict[str, str]:
        """A content hash of each part, so an artifact made from other data (a file edited in
        place, a new hub revision) is never reused: what the config alone cannot tell."""
        def digest(items: list[Item]) -> str:
            rows = [dataclasses.asdict(it) for it in items]
            return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]

        return {"calibration": digest(self.calibration), "train": digest(self.train_items),
                "eval": digest([it for name in sorted(self.eval_splits) for it in self.eval_splits[name]])}


def load_task(cfg: SPDConfig) -> Task:
    """The task's data from its source: the embedded testbed, the paper's benchmarks (hub) or
    data files (whose evaluation splits are task.files.eval, not evaluation.splits/domains)."""
    t = cfg.task
    sizes = {(d, s): t.n_eval_splits.get(f"{d}/{s}", t.n_eval)
             for d in cfg.evaluation.domains or [t.domain] for s in cfg.evaluation.splits}
    if t.source == "files":
        from spd_ray.tasks import files  # imports `datasets`, as the hub source does

        calibration, train, splits = files.load_files(t)
    elif t.source == "hub":
        from spd_ray.tasks import hub  # imports `datasets`: only runs that read the hub pay for it

        calibration, train = hub.calibration_and_train(t)
        splits = {f"{d}/{s}": hub.eval_split(t, d, s, n) for (d, s), n in sizes.items()}
    else:
        calibration = make_split(t.domain, "calibration", t.n_calibration, t.seed)
        train = make_split(t.domain, "train", t.n_train_prompts, t.seed)
        splits = {f"{d}/{s}": make_split(d, s, n, t.seed) for (d, s), n in sizes.items()}
    task = Task(calibration=calibration, train_items=train, eval_splits=splits)
    if t.prompt_format == "chat":
        chat_format(task, load_tokenizer(cfg.model.path, cfg.model.trust_remote_code), t.system_prompt)
    check_scorers(task.eval_splits)  # a scorer that cannot score fails now, not after the evaluation's generation
    return task


def chat_format(task: Task, tokenizer, system_prompt: str | None = None) -> None:
    """Every prompt of `task` as the user turn of the tokenizer's chat template (after
    `system_prompt`), ready for the assistant's answer: the one place the format is applied, so
    calibration, generation, fine-tuning and evaluation all see the same text."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"task.prompt_format=chat, but the tokenizer of {tokenizer.name_or_path} has no "
                          "chat template: use an instruct model's tokenizer, or task.prompt_format=raw")
    # the template writes the BOS token out; a tokenizer that adds one itself would add a second
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for it in [*task.calibration, *task.train_items, *(it for items in task.eval_splits.values() for it in items)]:
        text = tokenizer.apply_chat_template([*system, {"role": "user", "content": it.prompt}],
                                             tokenize=False, add_generation_prompt=True)
        if adds_bos and text.startswith(bos):
            text = text[len(bos):]
        raw = it.prompt if it.prompt in text else it.prompt.strip()  # some templates trim the turn
        start = text.find(raw)
        if start < 0:
            raise ValueError(f"task.prompt_format=chat: the chat template of {tokenizer.name_or_path} changes "
                             f"the text of prompt {it.id!r}, so its correctness spans cannot be placed; "
                             "use task.prompt_format=raw")
        it.prompt, it.user_span = text, (start, start + len(raw))
