"""Batched K/V gradient statistics equal the paper's one-example-at-a-time stacked gradients."""

from __future__ import annotations

import pytest
import torch

from spd_ray.gradients import accumulate_kv_gradient_stats, stacked_kv_gradients
from spd_ray.modeling import decoder_layers, kv_dim, kv_linears, load_model, resolve_layers
from spd_ray.subspace import SufficientStats
from tests.tiny_models import CONFIGS, tiny


def padded_batch(lengths: list[int], side: str, seed: int = 0) -> dict:
    """Random sequences with a few labeled tokens each, padded on `side`."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        row = torch.randint(3, 100, (n,), generator=g)
        lab = torch.full((n,), -100)
        lab[n - 3 : n - 1] = row[n - 3 : n - 1]  # a 2-token "answer" near the end
        sl = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, sl], labels[i, sl], mask[i, sl] = row, lab, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal up to float32 rounding relative to the largest entry (entries can be ~0)."""
    assert a.dtype == b.dtype == torch.float64
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


def rows_of(batch: dict) -> list[dict]:
    return [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_stats_equal_stacked_single_example_gradients(arch, side):
    model = tiny(arch)
    layers = resolve_layers(model, None)
    batches = [padded_batch([7, 12, 5], side, seed=1), padded_batch([9, 4], side, seed=2)]
    stats, loss = accumulate_kv_gradient_stats(model, batches, layers)
    ref = stacked_kv_gradients(model, [r for b in batches for r in rows_of(b)], layers)
    n_tokens = int(sum(b["attention_mask"].sum() for b in batches))
    assert loss > 0 and set(stats) == {(layer, k) for layer in layers for k in "kv"}
    for key, g in ref.items():
        s = stats[key]
        assert s.count == g.shape[0] == n_tokens  # pad positions add no rows
        assert g.abs().max() > 0
        close(s.gram, g.T @ g)
        close(s.total, g.sum(0))
    assert all(p.grad is None for p in model.parameters())


def test_stats_shards_sum_and_accumulate_into_existing():
    model = tiny("qwen2")
    layers = [2, 0]
    b1, b2 = padded_batch([6, 8], "right", 3), padded_batch([5], "right", 4)
    both, _ = accumulate_kv_gradient_stats(model, [b1, b2], layers)
    s1, _ = accumulate_kv_gradient_stats(model, [b1], layers)
    s2, _ = accumulate_kv_gradient_stats(model, [b2], layers)
    merged = {k: SufficientStats.from_dict(s1[k].to_dict()) + s2[k] for k in s1}
    again, _ = accumulate_kv_gradient_stats(model, [b2], layers, stats=s1)
    assert again is s1
    for key in both:
        for other in (merged[key], again[key]):
            torch.testing.assert_close(other.gram, both[key].gram)
            torch.testing.assert_close(other.total, both[key].total)
            assert other.count == both[key].count == 19


def test_gradient_is_wrt_pre_rope_k_proj_output_through_all_paths():
    """Manual check: retain the real k_proj/v_proj outputs and backprop the example's loss."""
    model = tiny("qwen3", layers=4)  # Qwen3 has a k-norm after k_proj: we must be before it
    batch = padded_batch([10], "right", seed=5)
    layers = resolve_layers(model, None)
    assert layers == [3, 2]
    stats, _ = accumulate_kv_gradient_stats(model, [batch], layers)

    outs = {}

    def keep(key):
        def fn(module, args, out):
            out.retain_grad()
            outs[key] = out

        return fn

    handles = [
        m.register_forward_hook(keep((layer, kind)))
        for layer in layers
        for kind, m in kv_linears(model, layer).items()
    ]
    try:
        logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
        labels = batch["labels"][0, 1:]
        torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100).backward()
    finally:
        for h in handles:
            h.remove()
    for key, out in outs.items():
        g = out.grad[0].double()
        assert out.shape[-1] == kv_dim(model, key[0])  # flattened kv_dim, before head reshape
        close(stats[key].gram, g.T @ g)


def test_example_without_labels_is_an_error():
    model = tiny("llama", layers=2)
    batch = padded_batch([6, 6], "right")
    batch["labels"][1] = -100
    with pytest.raises(ValueError, match="no labeled"):
        accumulate_kv_gradient_stats(model, [batch], [0])


def test_default_and_negative_layers():
    for n, expected in [(1, [0]), (2, [1]), (3, [2, 1]), (4, [3, 2]), (5, [4, 2])]:
        assert resolve_layers(tiny("llama", layers=n), None) == expected
    model = tiny("llama", layers=4)
    assert len(decoder_layers(model)) == 4
    assert resolve_layers(model, [-1, 0, 3]) == [3, 0]
    with pytest.raises(ValueError, match=r"-4\.\.3"):
        resolve_layers(model, [4])


def test_peft_wrapped_model_layers():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny("llama", layers=2), LoraConfig(r=2, target_modules=["q_proj"]))
    assert len(decoder_layers(model)) == 2 and kv_dim(model, 1) == 32


def test_load_model_errors_and_round_trip(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no/such/folder"):
        load_model("./no/such/folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="missing config.json"):
        load_model(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        load_model("spd-ray-test/not-a-model")
    tiny("qwen2", layers=2).save_pretrained(tmp_path / "m")
    model = load_model(str(tmp_path / "m"), device="cpu")
    assert not model.training and next(model.parameters()).dtype == torch.float32


def test_load_tokenizer_is_fast_and_pads_with_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from spd_ray.modeling import load_tokenizer

    vocab = {c: i for i, c in enumerate(["<eos>", "<unk>", *"abc "])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    tok = load_tokenizer(str(tmp_path))
    assert tok.is_fast and tok.pad_token == "<eos>"
    assert tok("ab c", return_offsets_mapping=True)["offset_mapping"][-1] == (3, 4)
