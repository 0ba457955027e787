"""Hard projection of K/V onto the capability subspace (paper Eq. 12): k <- k P_K, v <- v P_V.

Applied to the k_proj / v_proj outputs on every forward pass (prefill and each decode step), so the
KV cache holds projected values and RoPE is applied to the projected key. Because P is symmetric
and the map is linear, k P = x (P W)^T + P b: folding into a copy of the weights is equivalent.
A soft projection keeps a share `beta` of what lies outside the subspace, with the symmetric
P + beta (I - P) in place of P (`beta=0`: the paper's; 1: no projection), folded alike.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from spd_ray.config import SubspaceConfig
from spd_ray.core.modeling import kv_linears
from spd_ray.core.subspace import CapabilitySubspace

MODES = {"both": ("k", "v"), "k_only": ("k",), "v_only": ("v",)}


def kinds_for_mode(mode: str) -> tuple[str, ...]:
    if mode not in MODES:
        raise ValueError(f"unknown projection mode {mode!r}: use one of {', '.join(MODES)}")
    return MODES[mode]


def projector(subspace: CapabilitySubspace, layer: int, kind: str, beta: float = 0.0) -> torch.Tensor:
    """P + beta (I - P), in float32: the hard projector P = V_r V_r^T at beta 0."""
    p = subspace.projector(layer, kind).float()
    return p if not beta else beta * torch.eye(p.shape[0]) + (1 - beta) * p


def _targets(model, subspace: CapabilitySubspace, mode: str, beta: float = 0.0):
    """(module, projector in float32) for each projected k_proj / v_proj, kv_dim checked."""
    kinds = kinds_for_mode(mode)
    out = []
    for layer in subspace.layers:
        modules = kv_linears(model, layer)
        for kind in kinds:
            if (layer, kind) not in subspace.bases:
                raise ValueError(
                    f"the subspace has no {kind.upper()} basis for layer {layer} (mode={mode!r})"
                )
            d, model_d = subspace.bases[(layer, kind)].shape[0], modules[kind].out_features
            if d != model_d:
                raise ValueError(
                    f"layer {layer} {kind}_proj: the subspace has d={d} but the model's "
                    f"kv_dim is {model_d}: was the subspace computed on a different "
                    "model?"
                )
            out.append((modules[kind], projector(subspace, layer, kind, beta)))
    return out


@contextmanager
def projection_hooks(model, subspace: CapabilitySubspace, mode: str = SubspaceConfig.mode,
                     beta: float = SubspaceConfig.beta) -> Iterator:
    """Within the block, the target k_proj / v_proj outputs of `model` are replaced by out @ P
    (`mode`: "both", "k_only" or "v_only"; `beta` > 0: the soft P + beta (I - P)); yields
    `model`, whose hooks are removed on exit."""

    def hook(p32: torch.Tensor):
        cache: dict = {}

        def fn(module, args, out):
            key = (out.dtype, out.device)
            if key not in cache:  # cast once per dtype/device, not per token
                cache[key] = p32.to(device=out.device, dtype=out.dtype)
            return out @ cache[key]

        return fn

    handles = [m.register_forward_hook(hook(p)) for m, p in _targets(model, subspace, mode, beta)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def fold_projection(model, subspace: CapabilitySubspace, mode: str = SubspaceConfig.mode,
                    inplace: bool = False, beta: float = SubspaceConfig.beta):
    """A deep copy whose k_proj / v_proj have W <- P W and b <- P b (`beta`: the soft
    projector); the original is untouched (`inplace`: `model` itself is folded and returned,
    for a model loaded only to be folded)."""
    targets = _targets(model, subspace, mode, beta)  # checks before the (possibly large) copy
    names = {id(m): name for name, m in model.named_modules()}
    folded = model if inplace else copy.deepcopy(model)
    for module, p in targets:
        dst = folded.get_submodule(names[id(module)])
        if not isinstance(dst, torch.nn.Linear):
            raise ValueError(
                f"cannot fold into {type(dst).__name__}: merge adapters first "
                "(merge_and_unload) or use projection_hooks"
            )
        p = p.to(dst.weight.device)
        dst.weight.copy_((p @ dst.weight.float()).to(dst.weight.dtype))
        if dst.bias is not None:
            dst.bias.copy_((p @ dst.bias.float()).to(dst.bias.dtype))
    return folded


@torch.no_grad()
def energy_outside(model, subspace: CapabilitySubspace, batches) -> dict[tuple[int, str], float]:
    """How much the projection removes on these inputs: per (layer, kind) of `subspace`, the
    share of the k_proj / v_proj outputs' energy (sum of squares over the real tokens of
    `batches`: dicts of input_ids and attention_mask) outside the subspace, 1 - |kU|² / |k|².
    Near 0, projecting changes nothing; the gradient subspace's own energy (stage 1) says nothing
    about it, since it is measured on the gradients, not the activations."""
    modules = {(layer, kind): kv_linears(model, layer)[kind] for layer, kind in subspace.bases}
    totals = {key: [0.0, 0.0] for key in modules}  # |k|², |kU|²
    mask: list[torch.Tensor] = []

    def hook(key):
        basis = subspace.bases[key].float()

        def fn(module, args, out):
            keep = mask[0].to(out.device).unsqueeze(-1)
            k = out.float() * keep
            totals[key][0] += float(k.pow(2).sum())
            totals[key][1] += float((k @ basis.to(out.device)).pow(2).sum())
        return fn

    handles = [m.register_forward_hook(hook(key)) for key, m in modules.items()]
    try:
        for batch in batches:
            mask[:] = [batch["attention_mask"]]
            model(input_ids=batch["input_ids"].to(model.device),
                  attention_mask=batch["attention_mask"].to(model.device))
    finally:
        for h in handles:
            h.remove()
    return {key: 1 - inside / total if total else 0.0 for key, (total, inside) in totals.items()}
