"""Right-padded batches of token rows, the one layout of calibration, the gradient pass and
fine-tuning: ids padded with the pad id, labels with -100 (out of the loss), a 0/1 mask of
the real tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_id(tokenizer) -> int:
    """The id that pads: the tokenizer's pad token, else its end-of-sequence token (many causal
    LMs ship without a pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def right_pad(rows: Sequence[Sequence[int] | torch.Tensor], value: int,
              width: int | None = None) -> torch.Tensor:
    """`rows` as one (len(rows), width) long tensor, each right-padded with `value` to `width`
    (default: the longest row)."""
    width = max(len(row) for row in rows) if width is None else width
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row)
    return out


def padded_batch(ids: Sequence, labels: Sequence, pad: int, width: int | None = None) -> dict:
    """`input_ids`, `attention_mask` and `labels` of token rows and their labels, right-padded
    to `width` (default: the longest row)."""
    return {"input_ids": right_pad(ids, pad, width),
            "attention_mask": right_pad([[1] * len(row) for row in ids], 0, width),
            "labels": right_pad(labels, -100, width)}


def rows_that_fit(free_bytes: int, bytes_per_token: int, tokens_per_row: int, requested: int,
                  share: float = 0.8) -> int:
    """How many rows of `tokens_per_row` tokens decode at once within `share` of `free_bytes`
    (the rest: the allocator's slack), at most `requested`, at least 1, at `bytes_per_token`
    per token of each row (`core.modeling.bytes_per_token`)."""
    return max(1, min(requested, int(free_bytes * share) // max(1, bytes_per_token * tokens_per_row)))
