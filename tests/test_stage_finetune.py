"""Stage 3 on a real local Ray: 2 Ray Train workers (gloo), DeepSpeed ZeRO-3 on CPU."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import ray
import torch

from spd_ray.config import TESTBED_MODEL, FinetuneConfig, ModelConfig
from spd_ray.core.recipe import optimizer_and_schedule
from spd_ray.stages import finetune
from spd_ray.stages.deepspeed import CHECKPOINT_TAG, resolve_precision
from spd_ray.stages.finetune import HISTORY_FILE, SUMMARY_FILE, finetune_on_ray
from spd_ray.tasks.testbed import make_split

pytestmark = pytest.mark.slow

# tiny models stay whole unless this is 0: without it the test would not exercise ZeRO-3
PARTITION_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


@pytest.fixture(scope="module")
def dataset_rows():
    """32 rows of mixed lengths (every other one short), so that a micro-batch of 4 packs."""
    items = make_split("math", "train", 32)
    return [{"id": it.id, "seed": i, "prompt": it.prompt, "completion": it.answer} if i % 2 else
            {"id": it.id, "seed": i, "prompt": "Question: 2 + 2?\nAnswer:", "completion": " 4"}
            for i, it in enumerate(items)]


def _cfg(**kw) -> FinetuneConfig:
    base = dict(method="full", lr=5e-4, epochs=2.0, batch_size=4, max_length=128, num_workers=2,
                cpus_per_worker=1.0, zero_stage=3, warmup_epochs=0.5, checkpoints_to_keep=2)
    return FinetuneConfig(**{**base, **kw})


def _run(cfg, rows, tmp: Path, name: str, dtype: str = "auto", **kw):
    """The fine-tuned model's folder, and the history finetune_on_ray returned."""
    out = tmp / f"{name}-model"
    history = finetune_on_ray(ModelConfig(str(TESTBED_MODEL), dtype=dtype), cfg, ray.data.from_items(rows), out,
                              run_name=name, storage_path=str(tmp / "storage"),
                              ds_overrides=PARTITION_ALL, **kw)
    return out, history


def _summary(out: Path) -> dict:
    return json.loads((out / SUMMARY_FILE).read_text())


def _history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / HISTORY_FILE).read_text().splitlines()]


def _plain(path) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _checkpoint_weights(out: Path, **kw) -> dict:
    """The weights of the run's last checkpoint (the end of its last step), gathered from the
    ZeRO-3 shards by DeepSpeed's own offline tool: the engine's weights, independently of the
    export's consolidation."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(_summary(out)["checkpoint"], tag=CHECKPOINT_TAG, **kw)


@pytest.fixture(scope="module")
def full_run(local_ray, dataset_rows, tmp_path_factory):
    """One full fine-tuning ZeRO-3 job, shared by the partitioning and the export tests, and the
    uninterrupted run the fault test's run must equal: its output, the history returned, seconds."""
    import time

    tmp = tmp_path_factory.mktemp("full")
    start = time.monotonic()
    out, seen = _run(_cfg(), dataset_rows, tmp, "full")
    return out, seen, time.monotonic() - start


def test_deepspeed_config_is_concrete():
    fp32 = resolve_precision("auto", gpu=False)
    ds = finetune.training_deepspeed_config(_cfg(grad_accum=2, offload_optimizer=True), fp32, PARTITION_ALL)
    assert ds["train_batch_size"] == 4 * 2 * 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] is False and ds["gradient_clipping"] == 1.0
    assert "auto" not in json.dumps(ds)
    # the dtype rule of both stages: model.dtype, auto = bf16 on GPU and fp32 on CPU
    assert fp32 == torch.float32 and resolve_precision("auto", gpu=True) == torch.bfloat16
    assert resolve_precision("bfloat16", gpu=False) == torch.bfloat16
    gpu = finetune.training_deepspeed_config(_cfg(use_gpu=True), resolve_precision("auto", gpu=True))
    assert gpu["bf16"]["enabled"] is True and gpu["fp16"]["enabled"] is False
    assert finetune.training_deepspeed_config(_cfg(), torch.float16)["fp16"]["enabled"] is True
    with pytest.raises(ValueError, match="offload_params"):
        finetune.training_deepspeed_config(_cfg(zero_stage=2, offload_params=True), fp32)


def test_overlap_comm_is_deepspeeds_own_default():
    """Not forced off: DeepSpeed turns it on for ZeRO-3 (and off for 1 and 2) by itself."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fp32 = resolve_precision("auto", gpu=False)
    for stage, overlap in [(3, True), (2, False)]:
        zero = finetune.training_deepspeed_config(_cfg(zero_stage=stage), fp32)["zero_optimization"]
        assert "overlap_comm" not in zero and DeepSpeedZeroConfig(**zero).overlap_comm is overlap


def test_zero3_really_partitions(full_run):
    out, *_ = full_run
    s = _summary(out)
    assert s["world_size"] == 2
    assert s["zero3_params"] == s["params"] > 0
    assert s["zero3_partitioned"] == s["zero3_params"]  # every parameter is split over ranks
    # measured after training: with threshold 0 no parameter is kept whole between uses
    assert s["zero3_persistent"] == 0 and s["zero3_released"] == s["zero3_params"]
    assert s["local_numel"] < s["full_numel"]  # rank 0 holds about half of the weights
    assert s["local_numel"] <= s["full_numel"] // 2 + s["zero3_params"]


def test_full_zero3_export_equals_engine_weights(full_run):
    out, seen, _ = full_run
    trained = _checkpoint_weights(out)
    exported, original = _plain(out), _plain(str(TESTBED_MODEL))
    assert set(exported) <= set(trained) and "model.embed_tokens.weight" in exported
    for k, v in exported.items():
        assert v.numel() > 0 and v.shape == original[k].shape, k
        torch.testing.assert_close(v, trained[k].float(), rtol=0, atol=0)
    assert any(not torch.equal(exported[k], original[k]) for k in exported)  # it trained
    history = _history(out)
    s = _summary(out)
    assert [h["step"] for h in history] == list(range(1, s["total_steps"] + 1))
    assert s["steps_per_epoch"] == 4 and s["total_steps"] == 8  # 32 rows / 2 ranks / batch 4
    assert seen == history
    assert all(h["tokens"] > 0 and h["tokens_per_s"] > 0 for h in history)
    first = [h["loss"] for h in history if h["epoch"] == 0]
    last = [h["loss"] for h in history if h["epoch"] == 1]
    assert sum(last) / len(last) < sum(first) / len(first)


def test_packing_trains_as_padding_in_the_ray_loop(full_run, dataset_rows, tmp_path):
    """full_run packs its micro-batches (the default); padded, the same rows give the same
    losses step by step."""
    from spd_ray.core.modeling import load_tokenizer
    from spd_ray.core.recipe import build_examples, pack

    whole, *_ = full_run
    cfg = _cfg()
    tok = load_tokenizer(str(TESTBED_MODEL))
    examples = build_examples(tok, [r["prompt"] for r in dataset_rows], [r["completion"] for r in dataset_rows],
                              max_length=cfg.max_length)
    assert len(pack(examples[:4], tok.pad_token_id)["input_ids"]) < 4  # these rows do pack
    padded, _ = _run(dataclasses.replace(cfg, packing=False), dataset_rows, tmp_path, "padded")
    a, b = _history(whole), _history(padded)
    assert [h["step"] for h in a] == [h["step"] for h in b] == list(range(1, 9))
    assert [h["tokens"] for h in a] == [h["tokens"] for h in b]  # real tokens, not padding
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)


def test_bf16_on_cpu_trains_and_exports(local_ray, dataset_rows, tmp_path):
    """model.dtype=bfloat16, the GPUs' precision, through DeepSpeed's CPU accelerator."""
    from transformers import AutoConfig

    out, history = _run(_cfg(epochs=1.0), dataset_rows, tmp_path, "bf16", dtype="bfloat16")
    assert json.loads((out / SUMMARY_FILE).read_text())["total_steps"] == 4 == len(history)
    assert all(0 < h["loss"] < 20 and h["grad_norm"] == h["grad_norm"] for h in history)  # finite
    assert AutoConfig.from_pretrained(out).dtype == torch.bfloat16
    exported, original = _plain(out), _plain(str(TESTBED_MODEL))
    assert any(not torch.equal(exported[k], original[k]) for k in exported)  # it trained


def test_lora_zero3_merged_and_adapter_exports(local_ray, dataset_rows, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # 17 rows, batch 3, grad_accum 2: equal split drops 1 row, each rank reads 8 rows in 3
    # micro-batches, trains on 2 (one optimizer step) and drains the third
    rows = dataset_rows[:16] + [{**dataset_rows[1], "id": "extra"}]
    cfg = _cfg(method="lora", lora_r=4, lora_alpha=8, lr=1e-2, epochs=1.0, batch_size=3,
               grad_accum=2, gradient_checkpointing=True)
    merged, _ = _run(cfg, rows, tmp_path, "merged")
    assert _summary(merged)["plan"] == {"rows_per_rank": 8, "micro_per_epoch": 3,
                                        "steps_per_epoch": 1, "total_steps": 1, "n_epochs": 1}
    assert [h["step"] for h in _history(merged)] == [1]
    base = _plain(str(TESTBED_MODEL))
    weights = _plain(merged)
    assert set(weights) == set(base)
    changed = [k for k in base if not torch.equal(weights[k], base[k])]
    assert changed and all(".self_attn." in k for k in changed)  # only the LoRA targets moved

    adapter, _ = _run(dataclasses.replace(cfg, export="adapter", gradient_checkpointing=False), rows,
                      tmp_path, "adapter")
    assert (adapter / "adapter_config.json").exists()
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(TESTBED_MODEL), dtype=torch.float32), str(adapter))
    trained = _checkpoint_weights(adapter, exclude_frozen_parameters=True)  # the LoRA weights
    lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert lora and all(torch.equal(v, trained[k]) for k, v in lora.items())
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())  # B starts at 0


def test_one_worker_without_zero_trains_lora_in_bf16_and_exports(local_ray, dataset_rows, tmp_path):
    """What the 0.5B and one-GPU paper configs run: one worker, no ZeRO, bf16, LoRA."""
    cfg = _cfg(method="lora", lr=1e-3, epochs=1.0, num_workers=1, zero_stage=0, gradient_checkpointing=True)
    out = tmp_path / "zero0"
    history = finetune_on_ray(ModelConfig(str(TESTBED_MODEL), dtype="bfloat16"), cfg, ray.data.from_items(dataset_rows),
                              out, run_name="zero0", storage_path=str(tmp_path / "storage"))
    assert len(history) == 8 and all(0 < h["loss"] < 20 and h["grad_norm"] == h["grad_norm"] for h in history)
    export = json.loads((out / finetune.EXPORT_FILE).read_text())
    assert 0 < export["update_kept_in_model_dtype"] < 1  # bf16 would have lost some of it
    weights, base = _plain(out), _plain(str(TESTBED_MODEL))
    changed = [k for k in base if not torch.equal(weights[k], base[k])]
    assert changed and all(".self_attn." in k for k in changed)


def _lora_state_dict(rms: float) -> dict:
    """The state dict stage 3's ZeRO-3 export gathers from a LoRA run in bf16 (peft keeps the
    adapters in fp32), with each layer's update B A * alpha/r of `rms` per element: 1e-5 is the
    size of the paper's lr on its short runs."""
    from spd_ray.core.modeling import from_pretrained
    from spd_ray.core.recipe import prepare_model

    torch.manual_seed(0)
    net = prepare_model(from_pretrained(str(TESTBED_MODEL), torch.bfloat16), _cfg(method="lora", lora_r=8))
    for module in net.modules():
        if hasattr(module, "lora_A"):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            a.data, b.data = torch.randn_like(a), torch.randn_like(b)
            delta = module.get_delta_weight("default")
            b.data *= rms / delta.pow(2).mean().sqrt()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _update_kept_by(path: Path, state: dict) -> float:
    """The share of the LoRA update in `state` that the model saved in `path` keeps (its weights
    read as saved), measured against the base weights and the update merged in float64."""
    from safetensors.torch import load_file

    saved = load_file(str(path / "model.safetensors"))
    dot = norm = 0.0
    for key, base in state.items():
        if key.endswith(".base_layer.weight"):
            prefix = key.removesuffix(".base_layer.weight")
            a, b = state[f"{prefix}.lora_A.default.weight"].double(), state[f"{prefix}.lora_B.default.weight"].double()
            true = b @ a  # alpha / r = 1
            name = prefix.removeprefix("base_model.model.") + ".weight"
            got = saved[name].double() - base.double()
            dot, norm = dot + float((got * true).sum()), norm + float((true * true).sum())
    return dot / norm


@pytest.mark.parametrize("rms", [1e-5, 1e-3])
def test_a_lora_update_of_the_papers_size_survives_the_bf16_export(rms, tmp_path):
    """Merged in bf16, an update of 1e-5 per element mostly rounds back to the weights; merged
    in fp32 and saved in fp32 where bf16 would not keep it, the exported model keeps it all, and
    export.json says so. An update bf16 keeps is saved in bf16, the model's dtype."""
    state = _lora_state_dict(rms)
    model = ModelConfig(str(TESTBED_MODEL), dtype="bfloat16")
    cfg = _cfg(method="lora", lora_r=8)
    finetune._export(cfg, model, state, tmp_path / "auto", torch.bfloat16)
    export = json.loads((tmp_path / "auto" / finetune.EXPORT_FILE).read_text())
    finetune._export(dataclasses.replace(cfg, export_dtype="model"), model, state, tmp_path / "bf16", torch.bfloat16)
    in_bf16 = _update_kept_by(tmp_path / "bf16", state)
    assert export["update_kept_in_model_dtype"] == pytest.approx(in_bf16, abs=1e-3)
    if rms == 1e-5:
        assert in_bf16 < 0.5  # what a bf16 export kept before: most of the update rounded away
        assert export["dtype"] == "float32" and export["update_kept"] == 1.0
        assert _update_kept_by(tmp_path / "auto", state) > 0.999
    else:
        assert export["dtype"] == "bfloat16" and export["update_kept"] == pytest.approx(in_bf16, abs=1e-6)
        assert in_bf16 > 0.99
        assert _update_kept_by(tmp_path / "auto", state) == pytest.approx(in_bf16, abs=1e-6)


def _train_workers() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


@pytest.mark.faults
def test_a_worker_killed_mid_epoch_resumes_at_the_exact_step_and_ends_as_an_uninterrupted_run(
        full_run, dataset_rows, tmp_path):
    # one fault, three claims: Ray Train restarts the group from the latest registered checkpoint
    # (FailureConfig), the resume is at the exact step, and the training is a function of the
    # config alone: with the kill, the rows in the opposite order and a checkpoint after every
    # step, it has the batches, losses and weights of full_run, which trained uninterrupted
    import os
    import signal
    import threading
    import time

    whole, _, t_whole = full_run
    cfg = _cfg(checkpoint_every_steps=1, max_failures=2)  # full_run's 8 steps: 2 epochs of 4
    start = time.monotonic()
    killed: list[int] = []

    def kill_after_a_step_checkpoint():
        snapshot = tmp_path / "storage" / "cut" / "checkpoint_manager_snapshot.json"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            try:
                committed = json.loads(snapshot.read_text())["checkpoint_results"]
            except (OSError, ValueError, KeyError):
                committed = []
            if committed and _train_workers():
                os.kill(_train_workers()[-1], signal.SIGKILL)
                killed.append(committed[-1]["metrics"]["step"])
            time.sleep(0.05)

    thread = threading.Thread(target=kill_after_a_step_checkpoint, daemon=True)
    thread.start()
    # the rows arrive in another order: the data order is the seed's and the world size's alone
    cut, _ = _run(cfg, dataset_rows[::-1], tmp_path, "cut")
    print(f"faults: training worker killed at step {killed}, uninterrupted {t_whole:.0f} s, "
          f"with the kill {time.monotonic() - start:.0f} s")
    thread.join()
    summary = _summary(cut)
    assert summary["steps_per_epoch"] == 4 and summary["total_steps"] == 8
    assert killed and 0 < summary["start_step"] < 8, (killed, summary["start_step"])
    assert summary["start_step"] % 4, summary["start_step"]  # resumed mid-epoch
    assert summary["finished"] and summary["step"] == 8
    h_whole, h_cut = _history(whole), _history(cut)
    assert [h["step"] for h in h_cut] == list(range(1, 9))  # no step lost, none done twice
    assert [h["tokens"] for h in h_cut] == [h["tokens"] for h in h_whole]  # the same batches
    assert [h["loss"] for h in h_cut] == pytest.approx([h["loss"] for h in h_whole], abs=1e-6)
    # the schedule resumed too: each step used its own lr, not a new warm-up
    opt, sched = optimizer_and_schedule(torch.nn.Linear(1, 1), cfg, 8, 4)
    lrs = []
    for _ in range(8):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert [h["lr"] for h in h_cut] == pytest.approx(lrs, rel=1e-6)
    a, b = _plain(whole), _plain(cut)  # the exported models (method full: HF folders)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # the same final weights
