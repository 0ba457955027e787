"""A GGUF file as model.path: refused before any work where it cannot be converted; otherwise
converted once into a Hugging Face folder that every stage loads, and reused while its content
check holds. The conversion itself runs on the real model's GGUF (`make real-model`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from spd_ray.checks import check_model
from spd_ray.config import ConfigError, load_config
from spd_ray.core.gguf import GGUF_INSTALL, GGUFError, gguf_architecture, is_gguf


def _gguf(path, arch: str):
    """A GGUF file with its header alone: enough for the checks, which read no tensor."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_is_gguf_goes_by_the_extension():
    assert is_gguf("models/x.gguf") and is_gguf("X.GGUF") and not is_gguf("models/x")


def test_an_architecture_transformers_cannot_dequantize_is_an_error_naming_it(tmp_path):
    cfg = load_config(None, [f"model.path={_gguf(tmp_path / 'm.gguf', 'rwkv7')}"])
    with pytest.raises(ConfigError) as err:
        check_model(cfg)
    assert "'rwkv7'" in str(err.value) and "llama" in str(err.value) and "general" not in str(err.value)
    assert gguf_architecture(_gguf(tmp_path / "l.gguf", "llama")) == "llama"
    assert gguf_architecture(_gguf(tmp_path / "q.gguf", "qwen2moe")) == "qwen2moe"  # transformers' qwen2_moe


def test_a_file_that_is_not_gguf_or_is_missing_is_an_error(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x00\x01")
    with pytest.raises(GGUFError, match="cannot be read as GGUF"):
        gguf_architecture(tmp_path / "bad.gguf")
    with pytest.raises(ConfigError, match="no such file"):
        check_model(load_config(None, [f"model.path={tmp_path / 'none.gguf'}"]))


def test_without_the_gguf_package_the_error_gives_the_install_command(tmp_path, monkeypatch):
    path = _gguf(tmp_path / "m.gguf", "llama")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(ConfigError) as err:
        check_model(load_config(None, [f"model.path={path}"]))
    assert GGUF_INSTALL in str(err.value)


# ---------------------------------------------------------------------------------------
# the real model's GGUF file


@pytest.fixture(scope="module")
def converted(real_gguf, tmp_path_factory):
    """The pipeline's conversion of the real GGUF, run once: (config, the folder it gave)."""
    from spd_ray.pipeline import base_model

    out = tmp_path_factory.mktemp("gguf-runs")
    cfg = load_config(None, [f"model.path={real_gguf}", f"run.output_dir={out}", "model.device=cpu"])
    return cfg, base_model(cfg)


@pytest.mark.slow
def test_the_pipeline_converts_a_gguf_model_once_into_a_folder_every_stage_loads(converted, real_gguf):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from spd_ray.core.gguf import SOURCE_FILE

    cfg, resolved = converted
    folder = resolved.model.path
    assert folder != cfg.model.path and str(cfg.run.output_dir) in folder and "SmolLM2-135M" in folder
    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.num_hidden_layers, config.num_key_value_heads, config.head_dim) == ("llama", 30, 3, 64)
    assert config.tie_word_embeddings and not config.attention_bias and config.dtype == torch.bfloat16
    assert "quantization_config" not in json.loads((Path(folder) / "config.json").read_text())
    assert json.loads((Path(folder) / SOURCE_FILE).read_text())["architecture"] == "llama"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert json.loads((Path(folder) / "generation_config.json").read_text())["eos_token_id"] == 2
    # the folder's weights are the GGUF's, dequantized, up to bf16's rounding
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    from_gguf = AutoModelForCausalLM.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name,
                                                     dtype=torch.float32).state_dict()
    for name, w in plain.items():
        assert torch.allclose(w, from_gguf[name], rtol=2 ** -8, atol=0), name


@pytest.mark.slow
def test_a_converted_model_is_reused_while_its_content_check_holds_and_remade_when_damaged(converted, capsys):
    from spd_ray.pipeline import base_model

    cfg, first = converted
    weights = Path(first.model.path) / "model.safetensors"
    made = weights.stat().st_mtime_ns
    assert base_model(cfg).model.path == first.model.path
    assert weights.stat().st_mtime_ns == made and "reusing" in capsys.readouterr().out
    with weights.open("r+b") as f:  # one byte of the last weights flipped (a sliced check reads the end)
        f.seek(weights.stat().st_size - 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    assert base_model(cfg).model.path == first.model.path
    assert "damaged" in capsys.readouterr().out
    assert list(weights.parent.parent.glob("*.damaged-*"))  # the damaged one kept aside for a look
    assert base_model(cfg).model.path == first.model.path and "reusing" in capsys.readouterr().out
