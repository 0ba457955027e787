"""`model.trust_remote_code` reaches every stage: a model folder with code of its own (config.json's
auto_map names classes in the folder) is refused up front without it, and runs through stages 1-3
and both evaluations with it."""

from __future__ import annotations

import json

import pytest
import ray

from jobs import spd
from spd_ray.core.modeling import load_model

from .test_pipeline import SMALL
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


@pytest.mark.slow
def test_a_custom_code_model_runs_every_stage_with_trust_remote_code(tmp_path):
    model = custom_code_model(tmp_path / "model")
    args = [*SMALL, f"model.path={model}", "model.trust_remote_code=true",
            "task.n_calibration=8", "task.n_train_prompts=8", "task.n_eval=4",
            "evaluation.domains=[math]", "generation.max_new_tokens=16",
            "evaluation.max_new_tokens=16", "finetune.batch_size=4", "calibration.num_workers=1",
            "generation.replicas_max=1", f"run.output_dir={tmp_path}", "run.name=custom"]
    assert spd.main(args) == 0
    run = tmp_path / "custom"
    summary = json.loads((run / "model" / "train_summary.json").read_text())
    assert summary["finished"] and summary["step"] == summary["total_steps"] > 0  # stage 3 trained
    exported = json.loads((run / "model" / "config.json").read_text())
    assert exported["model_type"] == "spd_custom" and "auto_map" in exported
    assert (run / "model" / "modeling_spd_custom.py").exists()  # the export keeps its code
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"base", "spd"}  # evaluated before and after, with that code
    trained = load_model(str(run / "model"), trust_remote_code=True)
    assert type(trained).__name__ == "SpdCustomForCausalLM"
