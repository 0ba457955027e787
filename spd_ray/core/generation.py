"""Batched sampling from raw prompts, seeded per row.

A small decode loop instead of `model.generate`, because each row's randomness is its own: a
row's completion depends on its seed, not on which batch or replica it landed in. The noise is
counter-based: for (row seed, step, token id) an integer hash gives a uniform number, and the
sampled token wins an exponential race over the filtered distribution (Gumbel-max: argmax of
logits / T + Gumbel noise, which samples exactly softmax(logits / T) restricted to top-k /
top-p). It is one batched tensor operation per step, on the model's device, with no per-row
generator, no host copy of the probabilities and no per-token `.item()`; the noise bits are the
same on any device, so given the same logits a row samples the same tokens on CPU and GPU
(unless two candidates' perturbed scores tie within float rounding). Prompts are left-padded;
the KV cache is the model's own, so a projection applied by hooks on k_proj/v_proj (or folded
into their weights) is in the cache for every step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spd_ray.config import GenerationConfig
from spd_ray.core.batching import pad_id


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (cumulative - sorted_logits.softmax(-1)) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) in int64 arithmetic: products wrap, masks keep 32 bits."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def counter_uniform(seeds: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Uniform noise in (0, 1), one per (row, token id) of a decoding step: a hash of the row's
    32-bit seed, the step and the token id alone, on `seeds`' device (float32, 24 random bits)."""
    row = _mix32((_mix32(seeds & _MASK32) + step * 0x9E3779B9) & _MASK32)
    token = _mix32(torch.arange(vocab, device=seeds.device, dtype=torch.int64) * 0x85EBCA6B & _MASK32)
    bits = _mix32((row[:, None] ^ token[None, :]) + 0x27D4EB2F & _MASK32)
    return ((bits >> 8).float() + 0.5) / float(1 << 24)


def sample_tokens(logits: torch.Tensor, seeds: torch.Tensor, step: int, temperature: float,
                  top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) within top-k / top-p, by the
    exponential race on counter noise (`counter_uniform`)."""
    scores = _filter_logits(logits.float() / temperature, top_k, top_p)
    gumbel = -torch.log(-torch.log(counter_uniform(seeds, step, logits.shape[-1])))
    return (scores + gumbel).argmax(-1)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = GenerationConfig.max_new_tokens,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seeds: Sequence[int] | None = None,
    batch_size: int = GenerationConfig.batch_size,
) -> list[str]:
    """One completion per prompt (greedy when temperature == 0)."""
    if temperature > 0 and seeds is None:
        raise ValueError("sampling (temperature > 0) needs one seed per prompt")
    device = next(model.parameters()).device
    eos, pad = eos_token_ids(model, tokenizer), pad_id(tokenizer)
    tokenizer.padding_side = "left"
    # Similar lengths share a batch (less padding); results go back in the caller's order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        row_seeds = None
        if temperature > 0:
            row_seeds = torch.tensor([int(seeds[i]) for i in rows], dtype=torch.int64, device=device)
        new_tokens = decode_batch(model, ids, mask, max_new_tokens, temperature, top_p, top_k,
                             row_seeds, eos, pad)
        for i, toks in zip(rows, new_tokens):
            out[i] = tokenizer.decode(toks, skip_special_tokens=True)
    return out


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and each of the model's generation
    config (an int or a list; Qwen2.5-Instruct lists <|im_end|> and <|endoftext|>), where HF
    `generate` and vLLM stop too."""
    config = getattr(model, "generation_config", None)
    listed = getattr(config, "eos_token_id", None)
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    ids = [i for i in [tokenizer.eos_token_id, *listed] if i is not None]
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config has an EOS "
                         "token: a completion would never end before max_new_tokens")
    return list(dict.fromkeys(int(i) for i in ids))


def decode_batch(model, ids, mask, max_new_tokens, temperature, top_p, top_k, seeds, eos, pad):
    """The new tokens of each row, up to (not including) its first EOS. Tokens stay on the
    device until the batch ends; the one host sync per step is the batched "all done?"."""
    batch = ids.shape[0]
    eos = torch.tensor(eos, device=ids.device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    result = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
    cache, next_pos = result.past_key_values, position_ids[:, -1:] + 1
    done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    out = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=ids.device)
    length = torch.zeros(batch, dtype=torch.long, device=ids.device)  # tokens kept per row
    for step in range(max_new_tokens):
        logits = result.logits[:, -1, :]
        if temperature > 0:
            nxt = sample_tokens(logits, seeds, step, temperature, top_k, top_p)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        ended = torch.isin(nxt, eos)
        out[:, step] = nxt
        length += (~done & ~ended).long()
        done |= ended
        if bool(done.all()):
            break
        mask = torch.cat([mask, (~done).long()[:, None]], dim=-1)
        result = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos,
                       past_key_values=cache, use_cache=True)
        cache, next_pos = result.past_key_values, next_pos + 1
    return [row[:n] for row, n in zip(out.tolist(), length.tolist(), strict=True)]
