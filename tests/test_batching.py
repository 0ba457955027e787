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


def test_rows_that_fit_a_memory_budget(tmp_path):
    import json

    from spd_ray.core.batching import rows_that_fit
    from spd_ray.core.modeling import bytes_per_token

    # Qwen2.5-7B's shape in bf16: 28 layers x 2 x 512 KV + one layer's 2 x 18,944 + 4 x 3,584 of
    # prefill = 161 KB a token; a 24 GB GPU leaves ~8 GB beside the 15.2 GB of weights; MMLU's
    # longest rows ~1,900 tokens (prompt + 256 new): evaluation's batch of 64 does not fit
    shape = {"model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 3584, "num_attention_heads": 28,
             "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064}
    (tmp_path / "config.json").write_text(json.dumps(shape))
    per_token = bytes_per_token(str(tmp_path), torch.bfloat16)
    assert per_token == (28 * 2 * 512 + 2 * 18944 + 4 * 3584) * 2
    rows = rows_that_fit(8 * 2**30, per_token, 1900, requested=64)
    assert 8 <= rows < 64 and rows * per_token * 1900 <= 0.8 * 8 * 2**30 < (rows + 1) * per_token * 1900
    assert rows_that_fit(80 * 2**30, per_token, 1900, requested=64) == 64  # room: as asked
    assert rows_that_fit(0, per_token, 1900, requested=64) == 1  # never none
