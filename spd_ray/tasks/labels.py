"""What the calibration loss will look at (paper Eq. 6), reported before stage 1 so a user can
check it: how many examples are labeled, labeled tokens per example, the examples skipped and
why, and a few examples with their labeled tokens marked ⟦ ⟧. The tokens are labeled exactly as
stage 1 labels them (`spd_ray.core.spans.label_text`)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from spd_ray.config import SPDConfig
from spd_ray.core.spans import TRUNCATED, label_text, mark_labels
from spd_ray.tasks.item import Item

SAMPLE_CHARS = 200  # a rendered example is cut here, to keep the report a few console lines
SHOWN_IDS = 5  # ids listed per skip reason


@dataclass
class LabelReport:
    """The calibration set's labels, in figures and a few rendered examples."""
    spans: str  # where the correctness spans come from
    n_examples: int
    n_asked: int  # task.n_calibration: more than n_examples where the data holds fewer
    labeled_tokens: list[int]  # per labeled example
    skipped: dict[str, list[str]]  # reason -> ids of the examples skipped for it
    samples: list[tuple[str, str]]  # (id, text with its labeled tokens marked), the first few labeled

    @property
    def n_labeled(self) -> int:
        return len(self.labeled_tokens)

    def lines(self) -> list[str]:
        """The report as console lines."""
        out = [f"calibration labels ({self.spans}): {self.n_labeled} of {self.n_examples} examples labeled"]
        if self.n_examples < self.n_asked:
            out.append(f"  {self.n_examples} examples used of the {self.n_asked} asked "
                       "(task.n_calibration): the data holds no more")
        if self.labeled_tokens:
            t = self.labeled_tokens
            out.append(f"  labeled tokens per example: min {min(t)}, median {statistics.median(t):g}, "
                       f"max {max(t)}")
        for reason, ids in self.skipped.items():
            more = f", and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else ""
            out.append(f"  skipped {len(ids)}, {reason}: ids {', '.join(ids[:SHOWN_IDS])}{more}")
        for item_id, marked in self.samples:
            line = f"  {item_id}: {marked}"
            out.append(line if len(line) <= SAMPLE_CHARS else line[: SAMPLE_CHARS - 1] + "…")
        return out

    def require_labels(self, task: str) -> None:
        """An error, with the report, when stage 1 would have nothing to learn from."""
        if self.n_examples and not self.n_labeled:
            raise ValueError(f"no calibration example of task {task} has a labeled token, so stage 1 would "
                             "have nothing to learn from:\n" + "\n".join(self.lines()))


def label_report(cfg: SPDConfig, tokenizer, calibration_items: Sequence[Item],
                 n_samples: int = 3) -> LabelReport:
    """Label the calibration items as stage 1 will (task.calibration_loss, calibration.max_length)
    and report on them, with the first `n_samples` labeled examples rendered."""
    max_length = cfg.calibration.max_length
    labeled_tokens, skipped, samples = [], {}, []
    for item in calibration_items:
        spans = item.correctness_spans(cfg.task.calibration_loss)
        labeled = label_text(tokenizer, item.text, spans, max_length)
        if labeled.skip:
            reason = labeled.skip
            if reason == TRUNCATED:  # in the config's words
                reason = f"its spans lie past calibration.max_length={max_length} tokens"
            skipped.setdefault(reason, []).append(item.id)
            continue
        labeled_tokens.append(labeled.n_labeled)
        if len(samples) < n_samples:
            samples.append((item.id, mark_labels(item.text, labeled, context=30).replace("\n", "\\n")))
    return LabelReport(_spans_source(cfg, calibration_items), len(calibration_items),
                       cfg.task.n_calibration, labeled_tokens, skipped, samples)


def _spans_source(cfg: SPDConfig, items: Sequence[Item]) -> str:
    t = cfg.task
    if t.calibration_loss == "full":
        return "task.calibration_loss=full: every token"
    if t.source != "files":
        return "rule " + ", ".join(sorted({it.span_rule for it in items}))
    s = t.files.spans
    if s.mode == "rule":
        return f"rule {s.rule}"
    if s.mode == "regex":
        return f"regex '{s.regex}', " + ("last match" if s.match == "last" else "all matches")
    return f"explicit spans, column {t.files.columns.answer_spans!r}"
