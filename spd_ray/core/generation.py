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


def counter_uniform(seeds: torch.Tensor, step: int | torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform noise in (0, 1), one per (row, token id) of a decoding step: a hash of the row's
    32-bit seed, its step (one for all rows, or one per row) and the token id alone, on `seeds`'
    device (float32, 24 random bits)."""
    row = _mix32((_mix32(seeds & _MASK32) + step * 0x9E3779B9) & _MASK32)
    token = _mix32(torch.arange(vocab, device=seeds.device, dtype=torch.int64) * 0x85EBCA6B & _MASK32)
    bits = _mix32((row[:, None] ^ token[None, :]) + 0x27D4EB2F & _MASK32)
    return ((bits >> 8).float() + 0.5) / float(1 << 24)


def sample_tokens(logits: torch.Tensor, seeds: torch.Tensor, step: int | torch.Tensor, temperature: float,
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
    refill: int | None = None,
) -> list[str]:
    """One completion per prompt (greedy when temperature == 0), `batch_size` rows decoding at
    a time, continuously batched (`decode_stream`; `refill=batch_size`: static batches)."""
    if temperature > 0 and seeds is None:
        raise ValueError("sampling (temperature > 0) needs one seed per prompt")
    eos, pad = eos_token_ids(model, tokenizer), pad_id(tokenizer)
    # Similar lengths decode side by side (less padding); results go back in the caller's order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    ids = tokenizer([prompts[i] for i in order])["input_ids"]
    new = decode_stream(model, ids, max_new_tokens, temperature, top_p, top_k,
                        None if temperature <= 0 else [int(seeds[i]) for i in order], eos, pad,
                        slots=batch_size, refill=refill)
    out: list[str] = [""] * len(prompts)
    for i, toks in zip(order, new, strict=True):
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


def _left_padded(rows: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.as_tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def _cache_layers(cache) -> list:
    """The per-layer key/value holders of a DynamicCache: continuous batching trims and joins
    their tensors along the batch and time axes, which no public Cache method does."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or not all(type(layer) is DynamicLayer for layer in layers):
        raise TypeError(f"continuous batching needs a DynamicCache of full-attention layers, got "
                        f"{type(cache).__name__}; use refill=batch_size (static batches)")
    return layers


def _join(old, new, old_mask: torch.Tensor, new_mask: torch.Tensor):
    """Two batches' caches and masks as one: the narrower left-padded (zeros, masked out) to the
    wider, then stacked along the batch axis into `old`."""
    width = max(old_mask.shape[1], new_mask.shape[1])

    def left(x: torch.Tensor, dim: int) -> torch.Tensor:
        short = width - x.shape[dim]
        if not short:
            return x
        shape = list(x.shape)
        shape[dim] = short
        return torch.cat([x.new_zeros(shape), x], dim=dim)

    for a, b in zip(_cache_layers(old), _cache_layers(new), strict=True):
        a.keys = torch.cat([left(a.keys, 2), left(b.keys, 2)])
        a.values = torch.cat([left(a.values, 2), left(b.values, 2)])
    return old, torch.cat([left(old_mask, 1), left(new_mask, 1)])


def decode_stream(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
                  top_p: float, top_k: int, seeds: Sequence[int] | None, eos: Sequence[int], pad: int,
                  *, slots: int, refill: int | None = None) -> list[list[int]]:
    """The new tokens of each prompt (token ids), up to (not including) its first EOS, with at
    most `slots` rows decoding at a time: a finished row hands its slot to the next prompt
    (continuous batching). Free slots are refilled once there are `refill` of them (default a
    quarter of the slots; `refill=slots` gives static batches): the new prompts are prefilled
    together and their KV cache joined to the live one, left-padded to a common width, and
    columns no live row uses any more are cut off. A row's noise depends on its seed and its
    own step only (`counter_uniform`), so its text does not depend on which rows it decoded
    beside, given the same logits. Tokens stay on the device until their row ends; the one host
    sync per step is the batched "any row done?"."""
    if max_new_tokens < 1 or not prompts:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    refill = max(1, min(slots, refill or max(1, slots // 4)))
    eos_ids = torch.tensor(list(eos), device=device)
    out: list[list[int] | None] = [None] * len(prompts)
    queue = 0  # the next prompt to admit
    live = torch.empty(0, dtype=torch.long, device=device)  # the prompt index of each live row
    cache = mask = logits = pos = step = row_seeds = tokens = None
    while queue < len(prompts) or len(live):
        free = slots - len(live)
        if queue < len(prompts) and (free >= refill or not len(live)):
            take = list(range(queue, min(len(prompts), queue + free)))
            queue = take[-1] + 1
            ids, new_mask = _left_padded([prompts[i] for i in take], pad, device)
            new_pos = (new_mask.cumsum(-1) - 1).clamp(min=0)
            res = model(input_ids=ids, attention_mask=new_mask, position_ids=new_pos, use_cache=True)
            fresh = {"live": torch.tensor(take, device=device), "logits": res.logits[:, -1, :],
                     "pos": new_pos[:, -1:] + 1, "step": torch.zeros(len(take), dtype=torch.long, device=device),
                     "seeds": torch.tensor([seeds[i] for i in take], dtype=torch.int64, device=device)
                     if seeds is not None else None,
                     "tokens": torch.full((len(take), max_new_tokens), pad, dtype=torch.long, device=device)}
            if not len(live):
                cache, mask = res.past_key_values, new_mask
                live, logits, pos, step = fresh["live"], fresh["logits"], fresh["pos"], fresh["step"]
                row_seeds, tokens = fresh["seeds"], fresh["tokens"]
            else:
                used = int(mask.any(0).long().argmax())  # leading columns no live row attends to
                if used:
                    for layer in _cache_layers(cache):
                        layer.keys, layer.values = layer.keys[:, :, used:], layer.values[:, :, used:]
                    mask = mask[:, used:]
                cache, mask = _join(cache, res.past_key_values, mask, new_mask)
                live = torch.cat([live, fresh["live"]])
                logits, pos = torch.cat([logits, fresh["logits"]]), torch.cat([pos, fresh["pos"]])
                step, tokens = torch.cat([step, fresh["step"]]), torch.cat([tokens, fresh["tokens"]])
                if row_seeds is not None:
                    row_seeds = torch.cat([row_seeds, fresh["seeds"]])
        if temperature > 0:
            nxt = sample_tokens(logits, row_seeds, step, temperature, top_k, top_p)
        else:
            nxt = logits.argmax(-1)
        ended = torch.isin(nxt, eos_ids)
        tokens[torch.arange(len(live), device=device), step] = nxt
        length = step + (~ended).long()  # tokens kept: those before the EOS
        finished = ended | (length >= max_new_tokens)
        if bool(finished.any()):
            for i, row, n in zip(live[finished].tolist(), tokens[finished].tolist(),
                                 length[finished].tolist(), strict=True):
                out[i] = row[:n]
            keep = (~finished).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            live, mask, pos, step, tokens, nxt = (x[keep] for x in (live, mask, pos, step, tokens, nxt))
            if row_seeds is not None:
                row_seeds = row_seeds[keep]
            if not len(live):
                continue
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                    past_key_values=cache, use_cache=True)
        cache, logits, pos, step = res.past_key_values, res.logits[:, -1, :], pos + 1, step + 1
    return out
