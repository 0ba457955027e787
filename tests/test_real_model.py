"""The real model (SmolLM2-135M-Instruct, `make real-model`) through stage 1 and a few stage-2
rows on Ray, from its config: so that a change that breaks a real pretrained model (its
tokenizer, chat template, architecture) cannot land. The whole run at full size is
configs/real/smollm2-math.yaml (docs/real-model.md)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from spd_ray.config import load_config
from spd_ray.core.subspace import CapabilitySubspace
from spd_ray.pipeline import prepare
from spd_ray.stages.calibrate import capability_subspace
from spd_ray.stages.generate import Projection, self_generate
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
CONFIG = ROOT / "configs" / "real" / "smollm2-math.yaml"


@pytest.fixture(scope="module")
def real(real_model, real_data, tmp_path_factory, monkeypatch_module):
    """The shipped config at test sizes: 8 calibration examples, 4 training prompts."""
    monkeypatch_module.chdir(ROOT)  # the config's paths are the repository's
    cfg = load_config(CONFIG, [f"run.output_dir={tmp_path_factory.mktemp('runs')}", "task.n_calibration=8",
                               "task.n_train_prompts=4", "task.n_eval=4", "generation.max_new_tokens=24"])
    return prepare(cfg)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_the_real_task_in_the_chat_template_labels_the_final_number(real):
    cfg, task, labels = real
    assert labels.n_labeled == 8 and task.calibration[0].prompt.startswith("<|im_start|>system")
    text = task.calibration[0].text
    (start, end), = task.calibration[0].correctness_spans()
    assert text[start:end] == task.calibration[0].answer.rsplit("#### ", 1)[1]
    assert [it.gold for it in task.train_items] and task.train_items[0].metric == "number"


def test_stage1_and_projected_stage2_rows_on_the_real_model(local_ray, real, tmp_path):
    cfg, task, _ = real
    result = capability_subspace(cfg.model, cfg.calibration, cfg.subspace, task.calibration,
                                 cfg.task.calibration_loss, tmp_path / "subspace")
    sub = CapabilitySubspace.load(tmp_path / "subspace")
    assert sub.layers == [15, 29]  # the middle and the last of 30
    assert all(b.shape == (192, 96) for b in sub.bases.values())  # kv_dim 192, rank kv_dim // 2
    for basis in sub.bases.values():
        assert torch.allclose(basis.T @ basis, torch.eye(96), atol=1e-4)
    assert result.subspace.meta["skipped"] == 0 and 0 < result.subspace.meta["mean_calibration_loss"] < 20
    gen = dataclasses.replace(cfg.generation, replicas_min=1, replicas_max=1)
    made = self_generate(cfg.model, gen, task.train_prompts, tmp_path / "generations",
                         Projection.of(tmp_path / "subspace", cfg.subspace))
    assert made.kept == 4 and all(s["completion"].strip() for s in made.samples)
    assert not any("<|im_end|>" in s["completion"] for s in made.samples)  # stopped at its EOS, not written out
