"""A model folder with code of its own (config.json's auto_map names classes in the folder) is
refused up front without `model.trust_remote_code`. With it, it runs every stage on a simulated
multi-node cluster: tests/test_pipeline.py."""

from __future__ import annotations

import pytest
import ray

from jobs import spd
from spd_ray.core.modeling import load_model

from .tiny_models import custom_code_model


def test_a_custom_code_model_is_refused_without_trust_remote_code(tmp_path, capfd):
    model = custom_code_model(tmp_path / "model")
    with pytest.raises(ValueError, match="trust_remote_code"):  # what transformers does with it
        load_model(str(model))
    assert spd.main([f"model.path={model}", "evaluation.domains=[math]",
                     f"run.output_dir={tmp_path}/runs"]) == 2
    err = capfd.readouterr().err
    assert f"error: model.path={model}: the model comes with code of its own, which runs only " \
           "with model.trust_remote_code=true" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() and not ray.is_initialized()
