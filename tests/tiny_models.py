"""Tiny random causal LMs of the paper's backbone families, built in memory (no hub)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}


def tiny(arch: str, layers: int = 3, seed: int = 0, **extra):
    torch.manual_seed(seed)
    cfg = CONFIGS[arch](vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        pad_token_id=0, eos_token_id=1, bos_token_id=2, **extra)
    return AutoModelForCausalLM.from_config(cfg).eval()
