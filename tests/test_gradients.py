"""Batched K/V gradient statistics equal the paper's one-example-at-a-time stacked gradients."""

from __future__ import annotations

import pytest
import torch

from spd_ray.core.gradients import accumulate_kv_gradient_stats, stacked_kv_gradients
from spd_ray.core.modeling import decoder_layers, kv_dim, kv_linears, load_model, resolve_layers
from spd_ray.core.subspace import SufficientStats
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


def mid_labeled_batch(lengths: list[int], side: str, seed: int = 0) -> dict:
    """Like padded_batch, but the answer sits mid-sequence: a long unlabeled tail follows it."""
    batch = padded_batch(lengths, side, seed)
    width = max(lengths)
    for i, n in enumerate(lengths):
        start = 0 if side == "right" else width - n
        row = batch["labels"][i]
        row[:] = -100
        a = start + n // 2
        row[a : a + 2] = batch["input_ids"][i, a : a + 2]
    return batch


@pytest.mark.parametrize("batch_size", [None, 1, 2, 5])
def test_any_rebatching_and_a_long_unlabeled_tail_give_the_reference(batch_size):
    """Positions past the last prediction position are not computed: their rows are exact zeros
    that still count (they shift the mean that centring subtracts)."""
    model = tiny("qwen2", layers=4)
    layers = resolve_layers(model, None)
    batches = [mid_labeled_batch([11, 6, 14], "left", 7), mid_labeled_batch([9, 13], "right", 8)]
    stats, _ = accumulate_kv_gradient_stats(model, batches, layers, batch_size=batch_size)
    ref = stacked_kv_gradients(model, [r for b in batches for r in rows_of(b)], layers)
    for key, g in ref.items():
        assert stats[key].count == g.shape[0] == 53
        # the tails after each answer (n - n//2 - 1 positions) really are zero rows
        assert int((g.abs().sum(1) == 0).sum()) == sum(n - n // 2 - 1 for n in [11, 6, 14, 9, 13])
        close(stats[key].gram, g.T @ g)
        close(stats[key].total, g.sum(0))


def test_gemma2_logit_softcapping_is_kept():
    """The head runs on the gathered positions inside the model's own forward, so logit
    post-processing after the head (Gemma-2 soft-capping) still applies."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                       final_logit_softcapping=0.5, sliding_window=4)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    batches = [padded_batch([12, 7, 10], "right", seed=9)]
    stats, loss = accumulate_kv_gradient_stats(model, batches, [2, 1])
    ref = stacked_kv_gradients(model, rows_of(batches[0]), [2, 1])
    for key, g in ref.items():
        close(stats[key].gram, g.T @ g)


def test_without_a_head_module_full_logits_are_gathered_after():
    model = tiny("mistral")
    model.get_output_embeddings = lambda: None  # e.g. a model whose head is not a module
    batches = [padded_batch([8, 11], "left", seed=6)]
    stats, _ = accumulate_kv_gradient_stats(model, batches, [2, 1])
    ref = stacked_kv_gradients(model, rows_of(batches[0]), [2, 1])
    for key, g in ref.items():
        close(stats[key].gram, g.T @ g)


def test_work_saved_head_only_at_labels_no_graph_below_lowest_target_flags_restored():
    model = tiny("llama", layers=4)
    layers = resolve_layers(model, None)
    assert min(layers) == 2
    batch = padded_batch([10, 6, 8], "right", seed=3)
    n_labeled = int((batch["labels"][:, 1:] != -100).sum())
    model.train()
    frozen = model.model.layers[0].mlp.up_proj.weight
    frozen.requires_grad_(False)
    seen: dict[str, list] = {"head": [], "mlp": [], "below": [], "lowest_in": [], "lowest_out": []}
    layer_mods = decoder_layers(model)
    handles = [
        model.lm_head.register_forward_hook(lambda m, a, o: seen["head"].append(a[0].shape)),
        layer_mods[3].mlp.register_forward_hook(lambda m, a, o: seen["mlp"].append(a[0].shape)),
        layer_mods[1].register_forward_hook(
            lambda m, a, o: seen["below"].append((o[0] if isinstance(o, tuple) else o).requires_grad)
        ),
        layer_mods[2].register_forward_pre_hook(
            lambda m, a, kw: seen["lowest_in"].append((a[0] if a else kw["hidden_states"]).requires_grad),
            with_kwargs=True,
        ),
        layer_mods[2].register_forward_hook(
            lambda m, a, o: seen["lowest_out"].append((o[0] if isinstance(o, tuple) else o).requires_grad)
        ),
    ]
    try:
        stats, loss = accumulate_kv_gradient_stats(model, [batch], layers)
    finally:
        for h in handles:
            h.remove()
    # vocab logits, and the last layer's MLP, only where a correctness token is predicted
    assert seen["head"] == seen["mlp"] == [torch.Size([1, n_labeled, 64])]
    assert seen["below"] == [False] and seen["lowest_in"] == [False]  # no graph below
    assert seen["lowest_out"] == [True]
    # flags and mode restored; no parameter gradient formed
    assert model.training and not frozen.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if p is not frozen)
    assert all(p.grad is None for p in model.parameters())
    # the returned loss is the mean over examples of each example's mean correctness CE
    model.eval()
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none"
    )
    per_example = ce.sum(1) / (batch["labels"][:, 1:] != -100).sum(1)
    assert loss == pytest.approx(float(per_example.mean()), rel=1e-5)


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

    from spd_ray.core.modeling import load_tokenizer

    vocab = {c: i for i, c in enumerate(["<eos>", "<unk>", *"abc "])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    tok = load_tokenizer(str(tmp_path))
    assert tok.is_fast and tok.pad_token == "<eos>"
    assert tok("ab c", return_offsets_mapping=True)["offset_mapping"][-1] == (3, 4)
