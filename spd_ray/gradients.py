"""Gradients of the correctness-aligned loss w.r.t. the K/V projections (paper Eqs. 6-8).

For each calibration example, the loss is its own mean cross-entropy over its correctness tokens
(labels != -100). We take d(loss)/d(output of k_proj / v_proj) at each target layer: pre-RoPE,
pre k-norm, the flattened kv_dim vector. Every non-pad token of every sequence is a row of G.
Batches sum the per-example losses, so each row equals its single-example gradient.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from spd_ray.modeling import kv_linears
from spd_ray.subspace import SufficientStats


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _targets(model, layers: list[int]) -> dict[tuple[int, str], torch.nn.Module]:
    return {(layer, kind): m for layer in layers for kind, m in kv_linears(model, layer).items()}


def _per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over each example's labeled positions (causal shift), shape (B,)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    n = (labels != -100).sum(1)
    if (n == 0).any():
        raise ValueError(
            f"{int((n == 0).sum())} example(s) in this batch have no labeled "
            "(correctness) token after the causal shift: skip them before calibration"
        )
    return ce.sum(1) / n


def accumulate_kv_gradient_stats(
    model, batches: Iterable[dict], layers: list[int], stats: dict | None = None
) -> tuple[dict[tuple[int, str], SufficientStats], float]:
    """Sufficient statistics of the K/V gradient rows, and the mean calibration loss."""
    targets = _targets(model, layers)
    stats = {} if stats is None else stats
    for key, module in targets.items():
        stats.setdefault(key, SufficientStats.zeros(module.out_features))
    probes: dict[tuple[int, str], torch.Tensor] = {}

    def hook(key):
        # out + a zero leaf: its gradient is d(loss)/d(out) through every path, including through
        # later target layers, and needs no parameter gradients (a detached copy would cut those)
        def fn(module, args, out):
            probes[key] = torch.zeros_like(out, requires_grad=True)
            return out + probes[key]

        return fn

    handles = [m.register_forward_hook(hook(key)) for key, m in targets.items()]
    device, loss_sum, n_examples = _device(model), 0.0, 0
    try:
        with torch.enable_grad():
            for batch in batches:
                probes.clear()
                ids = batch["input_ids"].to(device)
                mask = batch["attention_mask"].to(device)
                labels = batch["labels"].to(device).masked_fill(mask == 0, -100)
                # positions from the mask, so left padding gives the same positions as no padding
                pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
                logits = model(
                    input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False
                ).logits
                losses = _per_example_loss(logits, labels)
                keys = list(targets)
                grads = torch.autograd.grad(
                    losses.sum(), [probes[k] for k in keys], allow_unused=True
                )
                keep = mask.bool()
                for key, g in zip(keys, grads, strict=True):
                    g = torch.zeros_like(probes[key]) if g is None else g
                    stats[key].update(g[keep].float())
                loss_sum += float(losses.detach().sum())
                n_examples += losses.shape[0]
    finally:
        for h in handles:
            h.remove()
    return stats, loss_sum / max(n_examples, 1)


def stacked_kv_gradients(
    model, examples: Iterable[dict], layers: list[int]
) -> dict[tuple[int, str], torch.Tensor]:
    """The paper's reference: one example at a time, gradients stacked into G (M x d) float64.

    Each example has 1-D `input_ids` and `labels` (and optionally `attention_mask`, whose zero
    positions are dropped, so rows of a padded batch can be passed as they are).
    """
    targets = _targets(model, layers)
    rows: dict[tuple[int, str], list[torch.Tensor]] = {key: [] for key in targets}
    outs: dict[tuple[int, str], torch.Tensor] = {}

    def hook(key):
        def fn(module, args, out):
            outs[key] = out

        return fn

    handles = [m.register_forward_hook(hook(key)) for key, m in targets.items()]
    device = _device(model)
    try:
        with torch.enable_grad():
            for ex in examples:
                ids, labels = torch.as_tensor(ex["input_ids"]), torch.as_tensor(ex["labels"])
                if "attention_mask" in ex:
                    keep = torch.as_tensor(ex["attention_mask"]).bool()
                    ids, labels = ids[keep], labels[keep]
                ids, labels = ids[None].to(device), labels[None].to(device)
                # a leaf input so the graph reaches every k/v output even with frozen weights
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeds, use_cache=False).logits
                loss = _per_example_loss(logits, labels).sum()
                keys = list(targets)
                grads = torch.autograd.grad(loss, [outs[k] for k in keys])
                for key, g in zip(keys, grads, strict=True):
                    rows[key].append(g[0].detach().to("cpu", torch.float64))
    finally:
        for h in handles:
            h.remove()
    return {key: torch.cat(r) for key, r in rows.items()}
