"""Correctness spans (paper Eq. 6, Table 6) and the token labels they give.

A rule finds the character spans that decide whether a calibration text is correct; a token
is labeled iff its character span, exactly as the tokenizer's offset mapping reports it, lies
fully inside a correctness span (the authors' rule). All other labels are -100. The spans are
the authors': math from just after the last `#### ` to the end of the text, multiple choice from
just after the last `Answer:` to the end (so the letter's token with its space, " C", as
Qwen-style tokenizers emit it), code every `assert ...` test line. Other capabilities give a
regex whose group 1 marks the span (`regex_spans`), or their spans outright.

`label_text` labels one text and says why it has no labeled token, if so; `calibration_batches`
batches the labeled ones, and `mark_labels` shows a user which characters the loss looks at.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from spd_ray.config import SPAN_RULE_NAMES
from spd_ray.core.batching import pad_id, padded_batch

# rule -> regex whose group 1 is a correctness span (the names are config.SPAN_RULE_NAMES)
SPAN_RULES: dict[str, re.Pattern] = {
    # GSM8K: from just after the last '#### ' to the end of the text
    "final_number": re.compile(r"#### ((?:(?!#### ).)*)\Z", re.DOTALL),
    # MMLU: from just after the last 'Answer:' to the end (BBH-style 'A: (B)' too)
    "answer_letter": re.compile(r"(?:Answer:|^A:)((?:(?!Answer:|^A:).)*)\Z", re.DOTALL | re.MULTILINE),
    # MBPP: the text of each `assert ...` test line
    "asserts": re.compile(r"^[ \t]*(assert\b.*?)[ \t]*$", re.MULTILINE),
}
if tuple(SPAN_RULES) != SPAN_RULE_NAMES:  # the config lists what this module defines
    raise ImportError(f"config.SPAN_RULE_NAMES {SPAN_RULE_NAMES} and core.spans.SPAN_RULES "
                      f"{tuple(SPAN_RULES)} differ: declare a rule in both")


def correctness_spans(text: str, rule: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of `text` that define correctness under `rule`.

    `full` is the paper's Table 5 ablation: the whole text counts.
    """
    if rule == "full":
        return [(0, len(text))] if text else []
    if rule not in SPAN_RULES:
        raise ValueError(f"unknown correctness-span rule {rule!r}; valid rules: {[*SPAN_RULES, 'full']}")
    return regex_spans(text, SPAN_RULES[rule], match="all")


def span_regex(pattern: str | re.Pattern) -> re.Pattern:
    """`pattern` compiled, checked to have the capture group whose text is the span."""
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"the regex '{pattern}' does not compile: {err}") from None
    if compiled.groups < 1:
        raise ValueError(f"the regex '{compiled.pattern}' has no capture group: put the part that "
                         "decides correctness in parentheses, e.g. '#### (\\S+)'")
    return compiled


def regex_spans(text: str, pattern: str | re.Pattern, match: str = "last") -> list[tuple[int, int]]:
    """Character spans of group 1 of `pattern` in `text`: of its last match (`match="last"`) or
    of every match (`"all"`); a match whose group is empty or unused gives no span."""
    if match not in ("last", "all"):
        raise ValueError(f"match={match!r}; valid values: ['last', 'all']")
    spans = [m.span(1) for m in span_regex(pattern).finditer(text) if m.end(1) > m.start(1)]
    return spans[-1:] if match == "last" else spans


def token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """For each token's (start, end) offsets, untrimmed: is it fully inside a correctness span?"""
    return [end > start and any(s <= start and end <= e for s, e in spans) for start, end in offsets]


# why a calibration text has no labeled token (`LabeledText.skip`)
NO_SPAN = "no correctness span"
TRUNCATED = "its spans lie past max_length"
NO_TOKEN = "no token lies wholly inside a span"


@dataclass
class LabeledText:
    """One calibration text as the loss sees it: its tokens (truncated at max_length), their
    labels (-100 off the correctness spans) and character offsets, and why nothing is labeled."""
    input_ids: list[int]
    labels: list[int]
    offsets: list[tuple[int, int]]
    truncated: bool  # max_length cut the text
    covered: int  # how many characters of the text the tokens cover (all unless cut)
    skip: str  # "" when some token is labeled, else NO_SPAN, TRUNCATED or NO_TOKEN

    @property
    def n_labeled(self) -> int:
        return sum(label != -100 for label in self.labels)


def label_text(tokenizer, text: str, spans: Sequence[tuple[int, int]], max_length: int) -> LabeledText:
    """Tokenize `text` (truncated at `max_length` tokens) and label the tokens that lie wholly
    inside its character `spans`."""
    enc = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=max_length)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    mask = token_mask(offsets, spans)
    mask[0] = False  # the first token has no prediction to learn from (causal shift)
    labels = [t if m else -100 for t, m in zip(enc["input_ids"], mask)]
    truncated = bool(enc.encodings[0].overflowing)
    covered = offsets[-1][1] if truncated else len(text)
    skip = ("" if any(mask) else NO_SPAN if not spans
            else TRUNCATED if truncated and any(e > covered for _, e in spans) else NO_TOKEN)
    return LabeledText(list(enc["input_ids"]), labels, offsets, truncated, covered, skip)


def mark_labels(text: str, labeled: LabeledText, context: int | None = None) -> str:
    """`text` as far as its tokens reach, each run of labeled tokens wrapped in ⟦ ⟧ (a cut text
    ends in …). With `context`, unlabeled stretches keep only that many characters next to a
    label, the rest elided as …."""
    runs: list[list[int]] = []  # [start, end) of adjacent labeled tokens
    for (start, end), label in zip(labeled.offsets, labeled.labels):
        if label == -100:
            continue
        if runs and start <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], end)
        else:
            runs.append([start, end])
    bounds = [0, *(b for run in runs for b in run), labeled.covered]
    gaps = [text[bounds[i]:bounds[i + 1]] for i in range(0, len(bounds), 2)]
    if context is not None:
        gaps = [_elide(g, context, head=i > 0, tail=i < len(gaps) - 1) for i, g in enumerate(gaps)]
    out = gaps[0]
    for (start, end), gap in zip(runs, gaps[1:]):
        out += f"⟦{text[start:end]}⟧{gap}"
    return out if out.endswith("…") or not labeled.truncated else out + "…"


def _elide(gap: str, context: int, head: bool, tail: bool) -> str:
    """`gap` with only `context` characters kept at the ends that touch a label (`head`: its
    start follows one; `tail`: its end precedes one)."""
    keep = context * (head + tail)
    if len(gap) <= keep + 1:
        return gap
    return (gap[:context] if head else "") + "…" + (gap[-context:] if tail else "")


def calibration_batches(tokenizer, texts: Sequence[str], spans: Sequence[Sequence[tuple[int, int]]], *,
                        batch_size: int, max_length: int, task: str = "") -> tuple[list[dict], int]:
    """Tokenized calibration batches with correctness labels from each text's character `spans`
    (`correctness_spans`, or a task's own), and how many texts were skipped.

    A text with no labeled token is skipped (and counted, `label_text` says why); if every text
    is skipped the calibration set cannot define a subspace, which is an error naming the task.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer: correctness spans need "
            "its offset mappings. Load the model's tokenizer.json (use_fast=True)."
        )
    labeled = [label_text(tokenizer, text, text_spans, max_length)
               for text, text_spans in zip(texts, spans, strict=True)]
    rows = [(lt.input_ids, lt.labels) for lt in labeled if not lt.skip]
    skipped = len(texts) - len(rows)
    if not rows:
        raise ValueError(
            f"no calibration example of task {task or '?'} has a labeled token: check the calibration format (e.g. GSM8K answers end "
            f"'#### <number>', MMLU texts end 'Answer: <letter>', MBPP texts carry 'assert' lines) "
            f"or max_length={max_length}"
        )
    pad = pad_id(tokenizer)
    batches = [padded_batch(*zip(*rows[start : start + batch_size]), pad)
               for start in range(0, len(rows), batch_size)]
    return batches, skipped
