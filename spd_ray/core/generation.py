"""Batched sampling from raw prompts, seeded per row.

A small decode loop instead of `model.generate`, because each row's randomness is its own: a
row's completion depends on its seed, not on which batch or replica it landed in. The noise is
counter-based: for (row seed, step) an integer hash gives one uniform number, and the token is
drawn by inverse CDF from softmax(logits / T) restricted to top-k / top-p. Top-p looks at each
row's best few dozen tokens (`topk`) rather than sorting the vocabulary, which is most of the
cost of HF's sampler; a row whose nucleus is wider is redone over the whole vocabulary and gets
the same token. It is batched tensor work on the model's device, with no per-row generator, no
host copy of the probabilities and no per-token `.item()`; the noise bits are the same on any
device, so given the same logits a row samples the same tokens on CPU and GPU, unless its
uniform lands within float rounding of a boundary between two tokens' cumulative weights. Prompts are left-padded;
the KV cache is the model's own, so a projection applied by hooks on k_proj/v_proj (or folded
into their weights) is in the cache for every step.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch

from spd_ray.config import GenerationConfig
from spd_ray.core.batching import pad_id
from spd_ray.core.modeling import _unwrap

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) in int64 arithmetic: products wrap, masks keep 32 bits."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def counter_uniform(seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """One uniform number in (0, 1) per row of a decoding step: a hash of the row's 32-bit seed
    and its step (one for all rows, or one per row) alone, on `seeds`' device (float32, 24
    random bits)."""
    bits = _mix32((_mix32(seeds & _MASK32) + step * 0x9E3779B9) & _MASK32)
    return ((bits >> 8).float() + 0.5) / float(1 << 24)


# Tokens ranked per row before top-p: a row whose nucleus does not fit in them is redone over the
# whole vocabulary (same tokens, a full sort), so the cap changes the cost, never a sample. 32,
# because `topk` costs about its k (0.4 ms for 64 x 2,048 at 32, 1.4 ms at 256 on one CPU thread)
# while nuclei at T 0.7 / top-p 0.9 seldom hold more (1-3% of rows on the testbed: redone alone).
CANDIDATES = 32


def _kept(vals: torch.Tensor, lse: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The probabilities (softmax over the whole vocabulary, whose logsumexp is `lse`) of a row's
    candidates, scores sorted descending, and which of them top-k and top-p keep. Ties are kept or
    dropped together: a token stays if the tokens strictly more probable than it hold less than
    top_p of the mass (of the top-k tokens' mass under top-k)."""
    p = (vals - lse).exp()
    keep = vals >= vals[:, top_k - 1 : top_k] if top_k else torch.ones_like(vals, dtype=torch.bool)
    if top_p < 1.0:
        total = (p * keep).sum(-1, keepdim=True) if top_k else 1.0
        first = torch.searchsorted(-vals, -vals)  # where each run of equal scores starts
        keep &= (p.cumsum(-1) - p).gather(-1, first) < top_p * total
    return p, keep


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first position whose cumulative weight exceeds u times the row's total."""
    c = weights.cumsum(-1)
    return torch.searchsorted(c, u * c[:, -1:]).clamp(max=c.shape[-1] - 1)


def _draw(weights: torch.Tensor, ids: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A token id drawn from the weights of `ids`, walked in token-id order so that the draw
    does not depend on how the candidates were ranked."""
    ids, order = ids.sort(-1)
    return ids.gather(-1, _inverse_cdf(weights.gather(-1, order), u)).squeeze(-1)


def sample_tokens(logits: torch.Tensor, seeds: torch.Tensor, step: int | torch.Tensor, temperature: float,
                  top_k: int = 0, top_p: float = 1.0, candidates: int = CANDIDATES) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) within top-k / top-p, by inverse-CDF
    sampling on one counter uniform per row (`counter_uniform`). The filters look at each row's
    `candidates` best tokens (`topk`, not a sort of the vocabulary); a row whose kept set reaches
    the last candidate is redone over the whole vocabulary, which draws the same token."""
    scores = logits.float() / temperature
    vocab = scores.shape[-1]
    top_k = top_k if 0 < top_k < vocab else 0
    lse = scores.logsumexp(-1, keepdim=True)
    u = counter_uniform(seeds, step)[:, None]
    if not top_k and top_p >= 1.0:
        return _inverse_cdf((scores - lse).exp(), u).squeeze(-1)
    k = min(vocab, max(top_k + 1, candidates))
    vals, ids = scores.topk(k, dim=-1)
    p, keep = _kept(vals, lse, top_k, top_p)
    out = _draw(p * keep, ids, u)
    # a kept last candidate may hide kept tokens outside the candidates (or, under top-k, ties of
    # the k-th score); this host sync (one per step) is skipped on the full vocabulary
    wide = keep[:, -1] | (vals[:, -1] >= vals[:, top_k - 1] if top_k else False)
    if k < vocab and bool(wide.any()):
        rows = wide.nonzero().squeeze(-1)
        vals, ids = scores[rows].sort(-1, descending=True)
        p, keep = _kept(vals, lse[rows], top_k, top_p)
        out[rows] = _draw(p * keep, ids, u[rows])
    return out


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
    # Similar token counts are prefilled side by side (less padding); results go back in the
    # caller's order.
    encoded = tokenizer(list(prompts))["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    ids = [encoded[i] for i in order]
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


@functools.cache
def _roomy_layer():
    """The `_RoomyLayer` class, made on first use: transformers is imported only after
    `spd_ray.offline_by_default` has set the hub variables."""
    from transformers.cache_utils import DynamicLayer

    class _RoomyLayer(DynamicLayer):
        """A DynamicLayer whose keys and values are views of buffers with spare columns, so that a
        decoding step writes its token in place: DynamicLayer's `torch.cat` copies the whole cache at
        every step, which was the largest single cost of decoding. Anything that swaps the tensors
        (batch selection, the joins below) is followed by one copy into a fresh buffer."""

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self._key_room = _append(self.keys, getattr(self, "_key_room", None), key_states)
            self.values, self._value_room = _append(self.values, getattr(self, "_value_room", None), value_states)
            return self.keys, self.values

    return _RoomyLayer


def _append(view: torch.Tensor, room: torch.Tensor | None, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, t = (view.shape[-2] if view.numel() else 0), new.shape[-2]
    if (room is None or not n or view.data_ptr() != room.data_ptr() or view.shape[0] != room.shape[0]
            or n + t > room.shape[-2]):
        room = new.new_empty(*new.shape[:2], n + t + max(64, (n + t) // 2), new.shape[-1])
        if n:
            room[..., :n, :] = view
    room[..., n : n + t, :] = new
    return room[..., : n + t, :], room


def _new_cache(model):
    """A DynamicCache of `_RoomyLayer`s where the model's layers are all full attention (others,
    e.g. sliding windows, keep their own layers: static batches only)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache(config=_unwrap(model).config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [_roomy_layer()() for _ in cache.layers]
    return cache


def _cache_layers(cache) -> list:
    """The per-layer key/value holders of the cache: continuous batching trims and joins their
    tensors along the batch and time axes, which no public Cache method does."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(type(layer) is _roomy_layer() for layer in layers):
        raise TypeError(f"continuous batching needs a DynamicCache of full-attention layers, got "
                        f"{[type(layer).__name__ for layer in layers or []]}; use refill=batch_size "
                        f"(static batches)")
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


def _forward_parameters(model):
    """The parameter names of the (unwrapped) model's forward."""
    return inspect.signature(_unwrap(model).forward).parameters


def _logits_to_keep(model) -> dict:
    """`logits_to_keep=1` where the model takes it (HF causal LMs do): a prompt's prefill then
    projects only its last position onto the vocabulary, as HF `generate` does."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(model) else {}


def cache_keyword(model) -> str:
    """The name the model's forward takes the KV cache by: `cache` from transformers 5.25 on
    (`past_key_values` is deprecated there and goes in 5.40), `past_key_values` before that and
    in models with code of their own that still take it."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def returned_cache(output):
    """The KV cache a forward returned, under either name (see `cache_keyword`)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


class _Rows:
    """The rows decoding at once, one per tensor row: which prompt each is (`live`), its next
    logits, position, step, tokens so far, whether it is done and how many of its tokens it keeps,
    its seed; with the KV cache and attention mask they share."""

    def __init__(self, model, max_new_tokens: int, pad: int, seeds: Sequence[int] | None):
        self.model, self.max_new_tokens, self.pad, self.seeds = model, max_new_tokens, pad, seeds
        self.device = next(model.parameters()).device
        self.kv, self.last_only = cache_keyword(model), _logits_to_keep(model)
        self.live = torch.empty(0, dtype=torch.long, device=self.device)
        self.cache = self.mask = None
        self.n_done = 0

    def __len__(self) -> int:
        return len(self.live)

    _PER_ROW = ("live", "logits", "pos", "step", "tokens", "done", "length", "row_seeds")

    def leave(self, out: list) -> None:
        """The finished rows give their tokens (those before the EOS) to `out` and leave."""
        for i, row, n in zip(self.live[self.done].tolist(), self.tokens[self.done].tolist(),
                             self.length[self.done].tolist(), strict=True):
            out[i] = row[:n]
        keep = (~self.done).nonzero().squeeze(-1)
        self.cache.batch_select_indices(keep)
        self.mask = self.mask[keep]
        for name in self._PER_ROW:
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[keep])
        self.n_done = 0

    def admit(self, prompts: Sequence[Sequence[int]], take: list[int]) -> None:
        """The prompts `take` (indices into `prompts`) prefilled together, and their KV cache
        joined to the live rows' (left-padded to a common width, columns no live row attends to
        cut off first)."""
        device, n = self.device, len(take)
        ids, mask = _left_padded([prompts[i] for i in take], self.pad, device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        res = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         **{self.kv: _new_cache(self.model)}, **self.last_only)
        fresh = {"live": torch.tensor(take, device=device), "logits": res.logits[:, -1, :], "pos": pos[:, -1:] + 1,
                 "step": torch.zeros(n, dtype=torch.long, device=device),
                 "tokens": torch.full((n, self.max_new_tokens), self.pad, dtype=torch.long, device=device),
                 "done": torch.zeros(n, dtype=torch.bool, device=device),
                 "length": torch.zeros(n, dtype=torch.long, device=device),
                 "row_seeds": None if self.seeds is None else
                 torch.tensor([self.seeds[i] for i in take], dtype=torch.int64, device=device)}
        if not len(self):
            self.cache, self.mask = returned_cache(res), mask
            for name, value in fresh.items():
                setattr(self, name, value)
            return
        used = int(self.mask.any(0).long().argmax())  # leading columns no live row attends to
        if used:
            for layer in _cache_layers(self.cache):
                layer.keys, layer.values = layer.keys[:, :, used:], layer.values[:, :, used:]
            self.mask = self.mask[:, used:]
        self.cache, self.mask = _join(self.cache, returned_cache(res), self.mask, mask)
        for name, value in fresh.items():
            if value is not None:
                setattr(self, name, torch.cat([getattr(self, name), value]))

    def record(self, nxt: torch.Tensor, eos_ids: torch.Tensor) -> None:
        """Each live row's next token: kept unless it is an EOS; a row is done at its EOS or
        when it has max_new_tokens."""
        active = ~self.done
        ended = torch.isin(nxt, eos_ids) & active
        rows = torch.arange(len(self), device=self.device)
        self.tokens[rows, self.step] = torch.where(active, nxt, self.tokens[rows, self.step])
        self.length = torch.where(active, self.step + (~ended).long(), self.length)
        self.done = self.done | ended | (active & (self.length >= self.max_new_tokens))
        self.n_done = int(self.done.sum())

    def forward(self, nxt: torch.Tensor) -> None:
        """One decoding step of every row through the KV cache (finished rows too, until they
        leave: their tokens are not kept). Where every layer attends to the whole past, the mask
        goes in as the 4D (batch, 1, 1, past) mask transformers would build: given a 2D mask
        without padding, transformers passes none, and CPU attention without a mask is 1.4x
        slower per step in bf16 (jobs/bench.py --parts limit on the real model)."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=-1)
        full = all(type(layer) is _roomy_layer() for layer in getattr(self.cache, "layers", None) or [None])
        mask = self.mask.bool()[:, None, None, :] if full else self.mask
        res = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=self.pos,
                         use_cache=True, **{self.kv: self.cache})
        self.cache, self.logits, self.pos = returned_cache(res), res.logits[:, -1, :], self.pos + 1
        self.step = self.step + (~self.done).long()


def decode_stream(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
                  top_p: float, top_k: int, seeds: Sequence[int] | None, eos: Sequence[int], pad: int,
                  *, slots: int, refill: int | None = None) -> list[list[int]]:
    """The new tokens of each prompt (token ids), up to (not including) its first EOS, with at
    most `slots` rows decoding at a time: finished rows hand their slots to the next prompts
    (continuous batching). A finished row keeps its slot until `refill` rows are finished
    (default a quarter of the slots; `refill=slots` gives static batches, where every row keeps
    its slot until the batch ends): then the finished rows leave, the next prompts are prefilled
    together and their KV cache joined to the live one, left-padded to a common width, and
    columns no live row uses any more are cut off (`_Rows`). Between refills the cache is not
    copied. A row's noise depends on its seed and its own step only (`counter_uniform`), so its
    text does not depend on which rows it decoded beside, given the same logits. Tokens stay on
    the device until their row leaves; the host syncs per step are the count of finished rows
    and, under top-k / top-p, whether a row's nucleus outgrew its candidates (`sample_tokens`)."""
    if max_new_tokens < 1 or not prompts:
        return [[] for _ in prompts]
    refill = max(1, min(slots, refill or max(1, slots // 4)))
    rows = _Rows(model, max_new_tokens, pad, seeds)
    eos_ids = torch.tensor(list(eos), device=rows.device)
    out: list[list[int] | None] = [None] * len(prompts)
    queue = 0  # the next prompt to admit
    while queue < len(prompts) or len(rows):
        if rows.n_done and (rows.n_done >= refill or rows.n_done == len(rows)):
            rows.leave(out)
        free = slots - len(rows)
        if queue < len(prompts) and (free >= refill or not len(rows)):
            take = list(range(queue, min(len(prompts), queue + free)))
            queue = take[-1] + 1
            rows.admit(prompts, take)
        if temperature > 0:
            nxt = sample_tokens(rows.logits, rows.row_seeds, rows.step, temperature, top_k, top_p)
        else:
            nxt = rows.logits.argmax(-1)
        rows.record(nxt, eos_ids)
        if rows.n_done < len(rows):  # else every row is finished: they leave before any further step
            rows.forward(nxt)
    return out
