"""Tiny random causal LMs of the paper's backbone families, built in memory (no hub)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from spd_ray.config import TESTBED_MODEL

CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}


def tiny(arch: str, layers: int = 3, seed: int = 0, **extra):
    torch.manual_seed(seed)
    cfg = CONFIGS[arch](vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        pad_token_id=0, eos_token_id=1, bos_token_id=2, **extra)
    return AutoModelForCausalLM.from_config(cfg).eval()


# A model with code of its own (loads only with trust_remote_code=True): the testbed model's
# weights and tokenizer under another model_type, whose classes live in the folder (auto_map).
CUSTOM_CONFIGURATION = '''from transformers import Qwen2Config


class SpdCustomConfig(Qwen2Config):
    model_type = "spd_custom"
'''
CUSTOM_MODELING = '''from transformers import Qwen2ForCausalLM

from .configuration_spd_custom import SpdCustomConfig


class SpdCustomForCausalLM(Qwen2ForCausalLM):
    config_class = SpdCustomConfig
'''


def custom_code_model(folder: Path) -> Path:
    """The shipped testbed model as a custom-code model in `folder`: config.json's auto_map
    points to configuration_spd_custom.py / modeling_spd_custom.py beside it."""
    shutil.copytree(TESTBED_MODEL, folder)
    (folder / "configuration_spd_custom.py").write_text(CUSTOM_CONFIGURATION)
    (folder / "modeling_spd_custom.py").write_text(CUSTOM_MODELING)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="spd_custom", architectures=["SpdCustomForCausalLM"], auto_map={
        "AutoConfig": "configuration_spd_custom.SpdCustomConfig",
        "AutoModelForCausalLM": "modeling_spd_custom.SpdCustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def tiny_smollm_folder(folder: Path, layers: int = 4, seed: int = 0) -> Path:
    """A random Llama of SmolLM2-135M's shape family in `folder`, saved as a converted GGUF is
    (bf16 safetensors): no k/v bias, tied input and output embeddings, 3 query heads per KV
    head; with the testbed model's tokenizer (its vocabulary size) so that it tokenizes text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TESTBED_MODEL))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=192, num_hidden_layers=layers,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=True, attention_bias=False, rms_norm_eps=1e-5,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
