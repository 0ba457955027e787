"""Hard K/V projection (Eq. 12): hooks and folded weights agree, with and without the KV cache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from spd_ray.core.generation import cache_keyword
from spd_ray.core.modeling import kv_dim, kv_linears, resolve_layers
from spd_ray.core.projection import fold_projection, kinds_for_mode, projection_hooks
from spd_ray.core.subspace import CapabilitySubspace, random_subspace
from tests.tiny_models import tiny

ARCHS = ["qwen2", "llama"]  # Qwen2 has k/v biases, Llama none
MODES = ["both", "k_only", "v_only"]


def tiny_projected(arch: str, layers: int = 3):
    model = tiny(arch, layers, attn_implementation="eager")
    if arch == "qwen2":  # non-zero biases, so folding P b is exercised
        for layer in resolve_layers(model, None):
            for m in kv_linears(model, layer).values():
                torch.nn.init.normal_(m.bias, std=0.5)
    return model


def half_rank_random(model, seed: int = 0) -> CapabilitySubspace:
    layers = resolve_layers(model, None)
    like = CapabilitySubspace(
        {
            (layer, kind): torch.zeros(kv_dim(model, layer), kv_dim(model, layer) // 2)
            for layer in layers
            for kind in "kv"
        }
    )
    return random_subspace(like, seed)


def prompts() -> dict:
    ids = torch.tensor([[0, 0, 5, 17, 42, 9, 33], [11, 23, 7, 64, 8, 19, 50]])  # left-padded
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def greedy(model, batch) -> torch.Tensor:
    out = model.generate(
        **batch, do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=None
    )
    return out[:, batch["input_ids"].shape[1] :]


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    return request.param, tiny_projected(request.param)


def test_modes():
    assert kinds_for_mode("both") == ("k", "v") and kinds_for_mode("v_only") == ("v",)
    with pytest.raises(ValueError, match="both, k_only, v_only"):
        kinds_for_mode("kv")


@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_hooks_equal_folded_weights(arch_model, mode):
    _, model = arch_model
    sub = half_rank_random(model)
    batch = prompts()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = model(**batch).logits
    folded = fold_projection(model, sub, mode)
    with projection_hooks(model, sub, mode):
        hooked = model(**batch).logits
        hooked_tokens = greedy(model, batch)
    torch.testing.assert_close(folded(**batch).logits, hooked, atol=1e-5, rtol=0)
    assert (hooked - plain).abs().max() > 1e-3  # the projection does something
    assert torch.equal(greedy(folded, batch), hooked_tokens)
    # the original is untouched and the hooks are gone
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(model(**batch).logits, plain, atol=0, rtol=0)


@torch.no_grad()
def test_cached_decoding_equals_full_recompute_under_hooks(arch_model):
    """The hook sees only new tokens; the cache must hold projected K/V (RoPE applied after)."""
    _, model = arch_model
    sub = half_rank_random(model, seed=1)
    ids = torch.tensor([[5, 17, 42, 9, 33, 71, 4, 88, 26, 3]])
    n_prompt = 4
    with projection_hooks(model, sub, "both"):
        full = model(input_ids=ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(input_ids=ids[:, :n_prompt], use_cache=True, **{cache_keyword(model): cache}).logits]
        for t in range(n_prompt, ids.shape[1]):
            steps.append(
                model(input_ids=ids[:, t : t + 1], use_cache=True, **{cache_keyword(model): cache}).logits
            )
        no_cache = model.generate(
            input_ids=ids[:, :n_prompt],
            do_sample=False,
            max_new_tokens=6,
            use_cache=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        cached = model.generate(
            input_ids=ids[:, :n_prompt],
            do_sample=False,
            max_new_tokens=6,
            pad_token_id=0,
            eos_token_id=None,
        )
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert torch.equal(no_cache, cached)
    # values carry no RoPE: the cached V of a projected layer lies in the subspace
    layer = sub.layers[-1]
    values = cache.layers[layer].values  # (B, kv_heads, T, head_dim)
    flat = values.transpose(1, 2).reshape(1, ids.shape[1], -1)
    p = sub.projector(layer, "v")
    torch.testing.assert_close(flat @ p, flat, atol=1e-5, rtol=0)


def test_mismatched_kv_dim_is_an_error(arch_model):
    _, model = arch_model
    other = tiny_projected("llama")
    other_d = torch.zeros(48, 24)
    bad = CapabilitySubspace({(2, "k"): other_d, (2, "v"): other_d})
    assert kv_dim(other, 2) == 32
    for call in (
        lambda: fold_projection(model, bad),
        lambda: projection_hooks(model, bad).__enter__(),
    ):
        with pytest.raises(
            ValueError, match=r"layer 2 k_proj.*d=48.*kv_dim is 32.*different model"
        ):
            call()
    assert all(not m._forward_hooks for m in kv_linears(model, 2).values())


def test_energy_outside_is_what_the_projection_removes(arch_model):
    """energy_outside = |k - kP|² / |k|² over the real tokens, checked against the k_proj / v_proj
    outputs captured directly; a basis of the whole space removes nothing."""
    from spd_ray.core.projection import energy_outside

    _, model = arch_model
    sub = half_rank_random(model)
    batch = prompts()
    outs = {}
    handles = [kv_linears(model, layer)[kind].register_forward_hook(
        lambda m, a, o, key=(layer, kind): outs.__setitem__(key, o.detach()))
        for layer, kind in sub.bases]
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    got = energy_outside(model, sub, [batch])
    keep = batch["attention_mask"].bool()
    for key, out in outs.items():
        k = out[keep].double()
        removed = k - k @ sub.projector(*key).double()
        assert got[key] == pytest.approx(float(removed.pow(2).sum() / k.pow(2).sum()), rel=1e-4)
        assert 0.2 < got[key] < 0.8  # a random half of the directions holds part of the energy
    whole = CapabilitySubspace({key: torch.eye(b.shape[0]) for key, b in sub.bases.items()})
    assert all(abs(v) < 1e-6 for v in energy_outside(model, whole, [batch]).values())
