"""The K/V activations themselves, as the control of the capability subspace: the sufficient
statistics of the k_proj / v_proj OUTPUTS (where the gradients of `core.gradients` are taken) at
every real token of the calibration texts, forward passes only, no labels. Their top principal
directions (`build_subspace`, centred as the gradient rows are) span the activation subspace
(`subspace.kind=activation`): the directions K and V use most, whatever the answer depends on.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from spd_ray.core.modeling import kv_linears
from spd_ray.core.subspace import SufficientStats


@torch.no_grad()
def accumulate_kv_activation_stats(model, batches: Iterable[dict], layers: list[int],
                                   stats: dict | None = None) -> dict[tuple[int, str], SufficientStats]:
    """Sufficient statistics of the k_proj / v_proj output rows of every token that
    `attention_mask` marks real (every token where there is none) in `batches`, per (layer, K|V)
    of `layers`; added into `stats` when given. The labels are not read."""
    targets = {(layer, kind): m for layer in layers for kind, m in kv_linears(model, layer).items()}
    stats = {} if stats is None else stats
    for key, module in targets.items():
        stats.setdefault(key, SufficientStats.zeros(module.out_features))
    keep: list[torch.Tensor] = []

    def hook(key):
        def fn(module, args, out):
            stats[key].update(out[keep[0].to(out.device)].float())
        return fn

    device = next(model.parameters()).device
    handles = [m.register_forward_hook(hook(key)) for key, m in targets.items()]
    training = model.training
    try:
        model.eval()
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
            keep[:] = [mask.bool()]
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    return stats
