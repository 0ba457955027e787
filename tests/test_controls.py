"""The study's controls: the activation subspace (principal directions of the K/V activations,
no labels) and the soft projection P + beta (I - P), folded like the hard one."""

from __future__ import annotations

import pytest
import torch

from spd_ray.artifacts import RunDir
from spd_ray.config import ConfigError, SubspaceConfig, load_config
from spd_ray.core.activations import accumulate_kv_activation_stats
from spd_ray.core.modeling import kv_linears, resolve_layers
from spd_ray.core.projection import fold_projection, projection_hooks, projector
from spd_ray.core.subspace import CapabilitySubspace, build_subspace, random_subspace
from tests.tiny_models import tiny


def _batch():
    ids = torch.tensor([[5, 17, 42, 9, 33, 0, 0], [11, 23, 7, 64, 8, 19, 50]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def test_activation_statistics_are_the_kv_outputs_of_the_real_tokens():
    model = tiny("llama", layers=2)
    batch = _batch()
    stats = accumulate_kv_activation_stats(model, [batch], [1])
    outs = {}
    handles = [m.register_forward_hook(lambda mod, a, o, k=k: outs.__setitem__(k, o.detach()))
               for k, m in kv_linears(model, 1).items()]
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    keep = batch["attention_mask"].bool()
    for kind in "kv":
        rows = outs[kind][keep].double()
        s = stats[(1, kind)]
        assert s.count == 12  # 5 + 7 real tokens, the two pads left out
        assert torch.allclose(s.gram, rows.T @ rows, atol=1e-6) and torch.allclose(s.total, rows.sum(0), atol=1e-6)
    # their subspace is the activations' principal directions: the top eigenvectors of the scatter
    sub = build_subspace(stats, rank_mode="fixed", rank=4)
    rows = outs["k"][keep].double()
    centred = rows - rows.mean(0)
    top = torch.linalg.eigh(centred.T @ centred).eigenvectors[:, -4:]
    p_ours, p_ref = sub.bases[(1, "k")].double() @ sub.bases[(1, "k")].double().T, top @ top.T
    assert torch.allclose(p_ours, p_ref, atol=1e-5)


def _half_rank(model) -> CapabilitySubspace:
    d = kv_linears(model, 0)["k"].out_features
    like = CapabilitySubspace({(layer, kind): torch.zeros(d, d // 2)
                               for layer in resolve_layers(model, None) for kind in "kv"})
    return random_subspace(like, 1)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_the_soft_projection_folds_exactly_and_spans_hard_to_none(arch):
    model = tiny(arch, layers=3, attn_implementation="eager")
    sub, batch = _half_rank(model), _batch()
    with torch.no_grad():
        plain = model(**batch).logits
        hard = fold_projection(model, sub)(**batch).logits
        for beta in (0.0, 0.5, 1.0):
            with projection_hooks(model, sub, beta=beta):
                hooked = model(**batch).logits
            assert torch.allclose(fold_projection(model, sub, beta=beta)(**batch).logits, hooked, atol=1e-5)
            if beta == 0.0:
                assert torch.allclose(hooked, hard, atol=1e-5)
            if beta == 1.0:
                assert torch.allclose(hooked, plain, atol=1e-5)
            if beta == 0.5:
                soft = hooked
    assert (soft - plain).abs().mean() < (hard - plain).abs().mean()
    layer = resolve_layers(model, None)[0]
    p, half = sub.projector(layer, "k").float(), projector(sub, layer, "k", 0.5)
    assert torch.allclose(half, 0.5 * torch.eye(p.shape[0]) + 0.5 * p, atol=1e-6)
    assert torch.allclose(half, half.T)


def test_beta_outside_zero_to_one_is_refused_and_list_the_range():
    with pytest.raises(ConfigError, match=r"in \[0, 1\]"):
        SubspaceConfig(beta=-0.1)
    with pytest.raises(ConfigError, match="activation"):
        load_config(None, ["subspace.kind=pca"])


def test_how_a_subspace_is_applied_does_not_remake_it_but_remakes_the_samples(tmp_path):
    base = load_config(None, [f"run.output_dir={tmp_path}"])
    soft = load_config(None, [f"run.output_dir={tmp_path}", "subspace.beta=0.5", "subspace.apply=hooks"])
    activation = load_config(None, [f"run.output_dir={tmp_path}", "subspace.kind=activation"])
    run = RunDir(base)
    assert run.key("subspace", soft) == run.key("subspace", base) != run.key("subspace", activation)
    assert run.key("generations", soft) != run.key("generations", base)
