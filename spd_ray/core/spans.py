"""Correctness spans (paper Eq. 6, Table 6) and the token labels they give.

A rule finds the character spans that decide whether a calibration text is correct; a token
is labeled iff its character span, exactly as the tokenizer's offset mapping reports it, lies
fully inside a correctness span (the authors' rule). All other labels are -100. The spans are
the authors': math from just after the last `#### ` to the end of the text, multiple choice from
just after the last `Answer:` to the end (so the letter's token with its space, " C", as
Qwen-style tokenizers emit it), code every `assert ...` test line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

# rule -> regex whose group 1 is a correctness span
SPAN_RULES: dict[str, re.Pattern] = {
    # GSM8K: from just after the last '#### ' to the end of the text
    "final_number": re.compile(r"#### ((?:(?!#### ).)*)\Z", re.DOTALL),
    # MMLU: from just after the last 'Answer:' to the end (BBH-style 'A: (B)' too)
    "answer_letter": re.compile(r"(?:Answer:|^A:)((?:(?!Answer:|^A:).)*)\Z", re.DOTALL | re.MULTILINE),
    # MBPP: the text of each `assert ...` test line
    "asserts": re.compile(r"^[ \t]*(assert\b.*?)[ \t]*$", re.MULTILINE),
}


def correctness_spans(text: str, rule: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of `text` that define correctness under `rule`.

    `full` is the paper's Table 5 ablation: the whole text counts.
    """
    if rule == "full":
        return [(0, len(text))] if text else []
    if rule not in SPAN_RULES:
        raise ValueError(f"unknown correctness-span rule {rule!r}; valid rules: {[*SPAN_RULES, 'full']}")
    return [m.span(1) for m in SPAN_RULES[rule].finditer(text) if m.end(1) > m.start(1)]


def token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """For each token's (start, end) offsets, untrimmed: is it fully inside a correctness span?"""
    return [end > start and any(s <= start and end <= e for s, e in spans) for start, end in offsets]


def calibration_batches(tokenizer, texts: Sequence[str], spans: Sequence[Sequence[tuple[int, int]]], *,
                        batch_size: int, max_length: int, task: str = "") -> tuple[list[dict], int]:
    """Tokenized calibration batches with correctness labels from each text's character `spans`
    (`correctness_spans`, or a task's own), and how many texts were skipped.

    A text with no labeled token is skipped (and counted); if every text is skipped the
    calibration set cannot define a subspace, which is an error naming the task.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer: correctness spans need "
            "its offset mappings. Load the model's tokenizer.json (use_fast=True)."
        )
    rows = []
    for text, text_spans in zip(texts, spans, strict=True):
        enc = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=max_length)
        mask = token_mask(enc["offset_mapping"], text_spans)
        mask[0] = False  # the first token has no prediction to learn from (causal shift)
        if any(mask):
            labels = [t if m else -100 for t, m in zip(enc["input_ids"], mask)]
            rows.append((enc["input_ids"], labels))
    skipped = len(texts) - len(rows)
    if not rows:
        raise ValueError(
            f"no calibration example of task {task or '?'} has a labeled token: check the calibration format (e.g. GSM8K answers end "
            f"'#### <number>', MMLU texts end 'Answer: <letter>', MBPP texts carry 'assert' lines) "
            f"or max_length={max_length}"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (row_ids, row_labels) in enumerate(chunk):  # right padding
            ids[r, : len(row_ids)] = torch.tensor(row_ids)
            labels[r, : len(row_ids)] = torch.tensor(row_labels)
            attention[r, : len(row_ids)] = 1
        batches.append({"input_ids": ids, "attention_mask": attention, "labels": labels})
    return batches, skipped
