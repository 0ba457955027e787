"""One task example (`Item`) and the names every task source shares: the capability domains and
evaluation splits (declared with the config, which checks them), the testbed's split names and
the multiple-choice letters.

Everything that handles examples (the hub loaders, scoring, the Ray stages) imports them from
here, not from the synthetic generator (`spd_ray.tasks.testbed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spd_ray.config import DOMAIN_SCORERS, DOMAINS, EVAL_SPLITS
from spd_ray.core.spans import correctness_spans

__all__ = ["DOMAINS", "EVAL_SPLITS", "SPLITS", "LETTERS", "Item"]
# the testbed's splits: labeled calibration, training prompts, evaluation, and the noisy corpus
# the tiny base model learns from
SPLITS = ("calibration", "train", *EVAL_SPLITS, "pretrain")
LETTERS = "ABCD"


@dataclass
class Item:
    id: str
    domain: str
    split: str
    prompt: str  # raw prompt: what generation and evaluation see
    answer: str  # reference completion (calibration only; never used for training)
    gold: str = ""  # final number / answer letter; empty for code
    tests: list[str] = field(default_factory=list)  # code: assert lines
    span_rule: str = ""  # which correctness-span rule applies (spd_ray.core.spans)
    # explicit correctness spans, [start, end) offsets into `answer`; when set, `span_rule` is unused
    answer_spans: list[tuple[int, int]] = field(default_factory=list)
    # chat format (spd_ray.tasks.task.chat_format): where the raw prompt lies in `prompt`, inside
    # the chat template's turns; a span rule reads the raw prompt + answer, never the template
    user_span: tuple[int, int] | None = None
    setup: str = ""  # code: run before the completion (MBPP sanitized `test_imports`)
    # scorer (spd_ray.tasks.evaluation.score): one of config.SCORERS (nll: the reference NLL of
    # `answer` only, no accuracy) or module:function (a user function); empty: the domain's own
    # (config.DOMAIN_SCORERS: math number, mcq choice, code asserts); None: nothing to score it
    # by (a files task's training prompts without answers)
    metric: str | None = ""
    pattern: str = ""  # regex scorer: group 1 of its first match in the completion is the answer

    def __post_init__(self):
        if self.metric == "":
            self.metric = DOMAIN_SCORERS.get(self.domain, "")

    @property
    def text(self) -> str:
        """Calibration text: prompt followed by the reference answer."""
        return self.prompt + self.answer

    def correctness_spans(self, loss: str = "correctness") -> list[tuple[int, int]]:
        """Character spans of `text` that the calibration loss looks at: the explicit answer
        spans, else the span rule's (read on the raw prompt + answer, then placed in `text`); an
        item with neither has none; `loss=full` (the Table 5 ablation) the whole text."""
        if loss == "full":
            return correctness_spans(self.text, "full")
        n = len(self.prompt)
        if self.answer_spans or not self.span_rule:  # neither: a span regex that matched nothing
            return [(n + s, n + e) for s, e in self.answer_spans]
        if self.user_span is None:
            return correctness_spans(self.text, self.span_rule)
        start, end = self.user_span
        raw = end - start  # raw prompt positions [0, raw) sit at start..end; the answer after n
        placed = []
        for s, e in correctness_spans(self.prompt[start:end] + self.answer, self.span_rule):
            if s < raw:
                placed.append((start + s, start + min(e, raw)))
            if e > raw:
                placed.append((n + max(s, raw) - raw, n + e - raw))
        return [(s, e) for s, e in placed if e > s]
