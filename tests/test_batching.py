"""Right padding: one layout for every batch of token rows, and the pad id's fallback."""

from types import SimpleNamespace

import torch

from spd_ray.core.batching import pad_id, padded_batch, right_pad


def test_rows_are_right_padded_to_the_longest_or_to_a_width():
    rows = [[5, 6, 7], [8], torch.tensor([9, 4])]
    assert right_pad(rows, 0).tolist() == [[5, 6, 7], [8, 0, 0], [9, 4, 0]]
    assert right_pad(rows, -1, width=4).tolist() == [[5, 6, 7, -1], [8, -1, -1, -1], [9, 4, -1, -1]]
    batch = padded_batch([[5, 6], [8]], [[-100, 6], [8]], pad=2)
    assert {k: v.tolist() for k, v in batch.items()} == {"input_ids": [[5, 6], [8, 2]],
                                                         "attention_mask": [[1, 1], [1, 0]],
                                                         "labels": [[-100, 6], [8, -100]]}
    assert all(v.dtype == torch.long for v in batch.values())


def test_the_pad_id_is_the_pad_token_else_the_end_of_sequence_token():
    assert pad_id(SimpleNamespace(pad_token_id=0, eos_token_id=3)) == 0  # 0 is a pad id, not "none"
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=3)) == 3
