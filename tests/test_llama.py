"""The real model's architecture on a tiny random model of its shape family (tests.tiny_models.
tiny_smollm_folder: Llama, no k/v bias, tied embeddings, 3:1 grouped-query attention): the
projection folded into the weights and into the checkpoint vLLM loads, LoRA on its attention and
the merged export, each with the tied output head intact."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from spd_ray.config import FinetuneConfig, ModelConfig
from spd_ray.core.modeling import kv_dim, kv_linears, load_model, load_tokenizer, resolve_layers
from spd_ray.core.projection import fold_projection, projection_hooks
from spd_ray.core.recipe import finished_model, prepare_model
from spd_ray.core.subspace import CapabilitySubspace, random_subspace
from spd_ray.stages.generate import Projection, save_folded_checkpoint
from tests.tiny_models import tiny_smollm_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_smollm_folder(tmp_path_factory.mktemp("smol") / "model")


@pytest.fixture(scope="module")
def subspace(folder, tmp_path_factory):
    """A random half-rank subspace of the default layers (last and middle), saved."""
    model = load_model(str(folder), "float32", "cpu")
    d = kv_dim(model, 0)
    like = CapabilitySubspace({(layer, kind): torch.zeros(d, d // 2)
                               for layer in resolve_layers(model, None) for kind in "kv"})
    out = tmp_path_factory.mktemp("subspace")
    random_subspace(like, 3).save(out)
    return out


def _batch(folder):
    tokenizer = load_tokenizer(str(folder))
    return tokenizer(["Question: Ann has 3 pens. How many pens?", "Answer: 7"], return_tensors="pt",
                     padding=True)


def _tied(model) -> bool:
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_the_shape_is_smollm2s():
    from transformers import AutoConfig

    from tests.conftest import REAL_MODEL

    if not (REAL_MODEL / "config.json").exists():
        pytest.skip("run make real-model to compare with the real model's config")
    real = AutoConfig.from_pretrained(str(REAL_MODEL))
    assert (real.model_type, real.tie_word_embeddings, real.attention_bias) == ("llama", True, False)
    assert real.num_attention_heads // real.num_key_value_heads == 3


def test_fold_equals_hooks_without_kv_bias_and_keeps_the_head_tied(folder, subspace):
    model = load_model(str(folder), "float32", "cpu")
    assert _tied(model) and all(m.bias is None for m in kv_linears(model, 0).values())
    sub = CapabilitySubspace.load(subspace)
    batch = _batch(folder)
    with torch.no_grad(), projection_hooks(model, sub):
        hooked = model(**batch).logits
    folded = fold_projection(model, sub)
    with torch.no_grad():
        assert torch.allclose(folded(**batch).logits, hooked, atol=1e-5)
        plain = model(**batch).logits
    assert not torch.allclose(plain, hooked, atol=1e-3)  # the projection bites
    assert _tied(folded) and torch.equal(folded.lm_head.weight, model.lm_head.weight)


def test_the_folded_checkpoint_for_vllm_reloads_with_the_projection_and_the_tied_head(folder, subspace, tmp_path):
    cfg = ModelConfig(str(folder), dtype="float32")
    out = save_folded_checkpoint._function(cfg, Projection(str(subspace)), str(tmp_path / "folded"))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    model = load_model(str(folder), "float32", "cpu")
    batch = _batch(folder)
    with torch.no_grad(), projection_hooks(model, CapabilitySubspace.load(subspace)):
        hooked = model(**batch).logits
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, hooked, atol=0.05)  # saved in bf16, as vLLM runs
    assert _tied(reloaded) and reloaded.config.tie_word_embeddings


def test_lora_targets_its_attention_and_the_merged_export_reloads_tied(folder, tmp_path):
    torch.manual_seed(0)
    net = prepare_model(load_model(str(folder), "float32", "cpu"), FinetuneConfig())
    targets = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in net.named_parameters() if "lora_A" in n}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj"}
    for name, p in net.named_parameters():  # a trained adapter: B is no longer zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    batch = _batch(folder)
    with torch.no_grad():
        adapted = net.eval()(**batch).logits  # eval: no LoRA dropout
    merged = finished_model(net)
    merged.save_pretrained(str(tmp_path / "merged"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, adapted, atol=1e-4)
    assert _tied(reloaded)
    base = load_model(str(folder), "float32", "cpu").state_dict()
    changed = {k for k, v in reloaded.state_dict().items() if not torch.equal(v, base[k])}
    assert changed and all(".self_attn." in k for k in changed)
