"""Loading models and finding the K/V projections that SPD hooks (docs/method.md,
"Where the gradients are taken" and "Projection and folding").

SPD works on the OUTPUT of each target layer's `k_proj` / `v_proj` Linear: before RoPE, before
any k-norm, before the head reshape. Models with a fused QKV Linear are not supported yet.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from spd_ray.core.gguf import gguf_architecture, is_gguf

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# "org/name" or "name": what a hub id looks like (anything else with a separator is a path)
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def _unwrap(model):
    # peft wraps the HF model; its layers sit under get_base_model()
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (plain or peft-wrapped)."""
    base = _unwrap(model)
    for owner in (
        getattr(base, "model", None),
        base,
        getattr(getattr(base, "model", None), "language_model", None),
    ):
        layers = getattr(owner, "layers", None) if owner is not None else None
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ValueError(
        f"cannot find the decoder layers of {type(base).__name__}: expected "
        "model.model.layers (Llama/Qwen/Mistral-style causal LM)"
    )


def resolve_layers(model, layers: list[int] | None) -> list[int]:
    """Target layers, 0-based; None gives the paper's default [L-1, L//2] (last, then middle).

    `model` is a model or its number of decoder layers (see `num_layers`)."""
    n = model if isinstance(model, int) else len(decoder_layers(model))
    if layers is None:
        layers = [n - 1, n // 2]
    out: list[int] = []
    for i in layers:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise ValueError(
                f"layer {i} is out of range: the model has {n} decoder layers, "
                f"valid indices are {-n}..{n - 1}"
            )
        if j not in out:
            out.append(j)
    return out


def kv_linears(model, layer: int) -> dict[str, torch.nn.Linear]:
    """The k_proj / v_proj modules of one decoder layer: where SPD takes gradients and projects."""
    (layer,) = resolve_layers(model, [layer])  # a clear error if out of range
    attn = getattr(decoder_layers(model)[layer], "self_attn", None)
    k, v = getattr(attn, "k_proj", None), getattr(attn, "v_proj", None)
    if k is None or v is None:
        raise ValueError(
            f"layer {layer} of {type(_unwrap(model)).__name__} has no separate "
            "self_attn.k_proj / v_proj (fused QKV?): folding the projection into fused "
            "weights is not supported yet"
        )
    return {"k": k, "v": v}


def kv_dim(model, layer: int) -> int:
    """num_key_value_heads * head_dim: the width of one K (or V) feature vector."""
    return kv_linears(model, layer)["k"].out_features


def _text_config(path: str, trust_remote_code: bool):
    from transformers import AutoConfig

    if is_gguf(path):  # read from the file's metadata: the checks run before it is converted
        gguf_architecture(path)
        config = AutoConfig.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)
    else:
        config = _from_hub(AutoConfig.from_pretrained, _resolve_source(path), trust_remote_code=trust_remote_code)
    return getattr(config, "text_config", None) or config


def num_layers(path: str, trust_remote_code: bool = False) -> int:
    """Decoder layers of a model, read from its config alone (no weights loaded)."""
    return int(_text_config(path, trust_remote_code).num_hidden_layers)


def config_kv_dim(path: str, trust_remote_code: bool = False) -> int:
    """Width of k_proj/v_proj outputs (num_key_value_heads x head_dim), from the config alone."""
    c = _text_config(path, trust_remote_code)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return int((getattr(c, "num_key_value_heads", None) or c.num_attention_heads) * head_dim)


def context_window(path: str, trust_remote_code: bool = False) -> int | None:
    """The positions the model was made for (max_position_embeddings), None if unstated."""
    value = getattr(_text_config(path, trust_remote_code), "max_position_embeddings", None)
    return int(value) if value else None


def bytes_per_token(path: str, dtype: torch.dtype, trust_remote_code: bool = False) -> int:
    """The memory one token of a decoding row takes, in `dtype`: its K and V in every layer,
    plus what one layer holds for it while the row's prompt is prefilled (the MLP's two
    intermediate projections and a few hidden states), the larger part for a 7B model."""
    c = _text_config(path, trust_remote_code)
    kv = num_layers(path, trust_remote_code) * 2 * config_kv_dim(path, trust_remote_code)
    prefill = 2 * (getattr(c, "intermediate_size", None) or 4 * c.hidden_size) + 4 * c.hidden_size
    return (kv + prefill) * torch.finfo(dtype).bits // 8


def _resolve_source(path: str) -> str:
    """A local folder (checked at once, so a typo fails fast) or a hub id."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ValueError(f"{path!r} is not a Hugging Face model folder: missing config.json")
        return str(p)
    if p.exists():
        raise ValueError(f"{path!r} is a file, not a Hugging Face model folder"
                         + (" (a GGUF file is converted by the pipeline's `base_model`)" if is_gguf(path) else ""))
    # a path-like name (or one with more than one separator) that exists nowhere is a typo
    if path.startswith(("/", "./", "../", "~")) or not _HUB_ID.match(path):
        raise FileNotFoundError(f"model folder not found: {path!r}")
    return path


def _from_hub(loader, source: str, **kwargs):
    try:
        return loader(source, **kwargs)
    except OSError as e:
        if Path(source).is_dir():
            raise
        why = (
            "hub access is off (HF_HUB_OFFLINE=1) and it is not in the local cache"
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
            else "it could not be fetched from the Hugging Face hub"
        )
        raise OSError(f"cannot load {source!r}: {why}; pass a local model folder instead") from e


def torch_device(device: str) -> torch.device:
    """The torch device of a config's `model.device`: auto = cuda where there is one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: str = "auto") -> torch.dtype:
    """The torch dtype of a config's `model.dtype`: auto = bfloat16 on CUDA, float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if torch_device(device).type == "cuda" else torch.float32
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}: use auto, {', '.join(_DTYPES)}")


def from_pretrained(path: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """A causal LM from a local folder or the hub, in `dtype`, as transformers builds it: on CPU,
    or partitioned over the ranks while a ZeRO-3 `HfDeepSpeedConfig` is alive."""
    from transformers import AutoModelForCausalLM

    return _from_hub(
        AutoModelForCausalLM.from_pretrained,
        _resolve_source(path),
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )


def load_model(
    path: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False
):
    """A causal LM in eval mode; dtype auto = bfloat16 on CUDA, float32 on CPU."""
    model = from_pretrained(path, resolve_dtype(dtype, device), trust_remote_code)
    return model.to(torch_device(device)).eval()


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """A fast tokenizer (correctness spans need its offset mappings); pad defaults to eos."""
    from transformers import AutoTokenizer

    source = _resolve_source(path)
    tok = _from_hub(AutoTokenizer.from_pretrained, source, trust_remote_code=trust_remote_code)
    if not getattr(tok, "is_fast", False):
        raise ValueError(
            f"the tokenizer of {path!r} ({type(tok).__name__}) is not a fast tokenizer: "
            "correctness spans need the offset mappings only a fast tokenizer gives"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
