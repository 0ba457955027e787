"""Stages 1 and 2 on a real local Ray cluster (2 workers / 2 replicas)."""

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from spd_ray.config import SPDConfig
from spd_ray.core.gradients import accumulate_kv_gradient_stats
from spd_ray.core.modeling import load_model, load_tokenizer, resolve_layers
from spd_ray.core.spans import calibration_batches
from spd_ray.core.subspace import build_subspace
from spd_ray.data import sampling_rows
from spd_ray.stages.calibrate import distributed_kv_stats
from spd_ray.stages.evaluate import evaluate_on_ray
from spd_ray.stages.generate import Projection, generate_dataset
from spd_ray.tasks.testbed import make_split
from tests.tolerances import assert_stats_close, assert_subspaces_close

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cfg(testbed_model_path):
    cfg = SPDConfig()
    cfg.model.path, cfg.model.device = testbed_model_path, "cpu"
    cfg.generation.batch_size = 4
    return cfg


def test_stage1_two_workers_equal_one_process(local_ray, cfg, testbed_tokenizer, testbed_model):
    items = make_split("math", "calibration", 12)
    batches, _ = calibration_batches(testbed_tokenizer, [it.text for it in items],
                                     [it.correctness_spans() for it in items], batch_size=4, max_length=256)
    layers = resolve_layers(testbed_model, None)
    local, local_loss = accumulate_kv_gradient_stats(testbed_model, batches, layers)
    cfg.calibration.num_workers = 2
    summed, loss, nodes = distributed_kv_stats(cfg.model, cfg.calibration, batches, layers)
    assert len(nodes) == 1  # one local node
    assert loss == pytest.approx(local_loss, rel=1e-5)
    # float32 gradients, batched otherwise in each worker: equal to rounding, not bit for bit
    assert_stats_close(summed, local)
    assert_subspaces_close(build_subspace(summed), build_subspace(local))


def test_stage2_samples_do_not_depend_on_replicas_and_fold_equals_hooks(local_ray, cfg, tmp_path):
    model = load_model(cfg.model.path, device="cpu")
    tok = load_tokenizer(cfg.model.path)
    items = make_split("math", "calibration", 8)
    batches, _ = calibration_batches(tok, [it.text for it in items], [it.correctness_spans() for it in items],
                                     batch_size=8, max_length=256)
    stats, _ = accumulate_kv_gradient_stats(model, batches, resolve_layers(model, None))
    build_subspace(stats).save(tmp_path / "subspace")
    rows = sampling_rows([it.prompt for it in make_split("math", "train", 10)], 1, seed=7)
    gen = dataclasses.replace(cfg.generation, max_new_tokens=24)

    def run(replicas: int, apply: str):
        g = dataclasses.replace(gen, replicas_min=replicas, replicas_max=replicas)
        projection = Projection(str(tmp_path / "subspace"), apply=apply)
        out = generate_dataset(ray.data.from_items(rows), cfg.model, g, context=512,
                               projection=projection).take_all()
        return {r["id"]: r["completion"] for r in out}

    one, two = run(1, "fold"), run(2, "fold")
    assert one == two and len(one) == 10
    assert len(set(one.values())) > 1  # sampled texts, not one string for every prompt
    assert run(2, "hooks") == two  # the same samples, the projection by hooks instead of folded


@pytest.mark.faults
def test_stage2_a_killed_replica_is_restarted_and_the_samples_are_the_same(local_ray, cfg, tmp_path):
    rows = sampling_rows([it.prompt for it in make_split("math", "train", 24)], 1, seed=7)
    gen = dataclasses.replace(cfg.generation, max_new_tokens=24, batch_size=2, replicas_min=2, replicas_max=2)
    start = time.monotonic()
    whole = generate_dataset(ray.data.from_items(rows), cfg.model, gen, context=512).take_all()
    t_whole, start = time.monotonic() - start, time.monotonic()
    killed = _kill_soon(b"MapBatches(Generator)", after_s=0.5)
    cut = generate_dataset(ray.data.from_items(rows), cfg.model, gen, context=512).take_all()
    print(f"faults: a replica killed, uninterrupted {t_whole:.0f} s, with the kill {time.monotonic() - start:.0f} s")
    assert killed, "no generation replica was seen"
    assert sorted(r["id"] for r in cut) == sorted(r["id"] for r in rows)  # every row exactly once
    assert {r["id"]: r["completion"] for r in cut} == {r["id"]: r["completion"] for r in whole}


def _kill_soon(cmdline: bytes, after_s: float = 0.0) -> list[int]:
    """SIGKILL (from a thread) the first process whose command line holds
    `cmdline`, once it has been seen for `after_s`; the list gets its pid."""
    killed: list[int] = []

    def kill():
        seen: dict[int, float] = {}
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            for entry in Path("/proc").iterdir():
                try:
                    if entry.name.isdigit() and cmdline in (entry / "cmdline").read_bytes():
                        pid = int(entry.name)
                        if time.monotonic() - seen.setdefault(pid, time.monotonic()) >= after_s:
                            os.kill(pid, signal.SIGKILL)
                            killed.append(pid)
                            break
                except OSError:
                    pass
            time.sleep(0.05)

    threading.Thread(target=kill, daemon=True).start()
    return killed


def test_evaluation_through_the_actor_pool(local_ray, cfg, testbed_model, testbed_tokenizer, tmp_path):
    from spd_ray.tasks.evaluation import evaluate_model

    splits = {"math/test": make_split("math", "test", 8), "code/test": make_split("code", "test", 4)}
    ev = dataclasses.replace(cfg.evaluation, max_new_tokens=32, batch_size=4)
    on_ray = evaluate_on_ray(cfg.model, ev, splits, tmp_path / "eval.json", cfg.generation).metrics
    assert on_ray == pytest.approx(evaluate_model(testbed_model, testbed_tokenizer, splits, ev), rel=1e-4)


def test_folded_checkpoint_for_vllm_matches_hooks(local_ray, cfg, tmp_path, testbed_model, testbed_tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    from spd_ray.core.projection import projection_hooks
    from spd_ray.core.subspace import CapabilitySubspace
    from spd_ray.stages.generate import FOLD_STAMP, VLLMGenerator, folded_checkpoint

    items = make_split("math", "calibration", 8)
    batches, _ = calibration_batches(testbed_tokenizer, [it.text for it in items],
                                     [it.correctness_spans() for it in items], batch_size=8, max_length=256)
    stats, _ = accumulate_kv_gradient_stats(testbed_model, batches, resolve_layers(testbed_model, None))
    subspace = tmp_path / "subspace"
    build_subspace(stats).save(subspace)
    fp32 = dataclasses.replace(cfg.model, dtype="float32")
    out = folded_checkpoint(fp32, Projection(str(subspace)))
    folded = AutoModelForCausalLM.from_pretrained(out)
    enc = testbed_tokenizer([items[0].prompt], return_tensors="pt")
    with torch.no_grad(), projection_hooks(testbed_model, CapabilitySubspace.load(subspace)):
        hooked = testbed_model(**enc).logits
    torch.testing.assert_close(folded(**enc).logits, hooked, atol=1e-4, rtol=1e-4)
    made = (Path(out) / FOLD_STAMP).stat().st_mtime_ns
    assert folded_checkpoint(fp32, Projection(str(subspace))) == out  # reused, not redone
    assert (Path(out) / FOLD_STAMP).stat().st_mtime_ns == made

    # backend=vllm with a subspace (stage 2, and evaluation's inference-only arm): generate_dataset
    # folds beside the subspace itself, in the dtype vLLM runs (auto: bfloat16 on its GPU)
    vllm = dataclasses.replace(cfg.generation, backend="vllm", gpus_per_replica=1)
    generate_dataset(ray.data.from_items([{"prompt": "x"}]), cfg.model, vllm, context=512,
                     projection=Projection(str(subspace)))
    assert AutoConfig.from_pretrained(tmp_path / "subspace.folded-both").dtype == torch.bfloat16
    try:
        import vllm as _  # noqa: F401
    except ImportError:  # here (no vLLM): the replica's error says what to install
        with pytest.raises(ImportError, match=r"pip install -e '\.\[vllm\]' in the clone"):
            VLLMGenerator(out, cfg.model, vllm, greedy=True, max_new_tokens=4, context=512)


def test_the_context_is_measured_from_the_prompts_and_sizes_every_backend(cfg):
    from spd_ray.config import ConfigError
    from spd_ray.stages.generate import context_length

    tok = load_tokenizer(cfg.model.path)
    prompts = ["Question: 1 + 1?\nAnswer:", "Question: " + "a b c " * 40 + "?\nAnswer:"]
    longest = max(len(tok(p)["input_ids"]) for p in prompts)
    assert context_length(cfg.model, cfg.generation, prompts, 64) == longest + 64  # hf
    vllm = dataclasses.replace(cfg.generation, backend="vllm", gpus_per_replica=1)
    assert context_length(cfg.model, vllm, prompts, 64) == longest + 64  # the engine's max_model_len
    with pytest.raises(ConfigError, match=rf"generation.max_model_len=100 is shorter than the longest "
                                          rf"prompt \({longest} tokens\) plus 64 new tokens: set "
                                          rf"generation.max_model_len={longest + 64}"):
        context_length(cfg.model, dataclasses.replace(vllm, max_model_len=100), prompts, 64)
    assert context_length(cfg.model, dataclasses.replace(vllm, max_model_len=2000), prompts, 64) == 2000
    with pytest.raises(ConfigError, match=r"more than the 512 positions of .*lower generation.max_new_tokens"):
        context_length(cfg.model, cfg.generation, prompts, 512)  # the testbed's window: 512


def test_the_vllm_engine_gets_the_context_and_is_shut_down_with_its_actor(local_ray, cfg, monkeypatch):
    """vLLM itself needs a GPU: a stand-in module records what the replica asks of it."""
    import sys
    import types

    from spd_ray.stages.generate import VLLMGenerator

    made, shut = [], []
    fake = types.ModuleType("vllm")

    class LLM:
        def __init__(self, **kwargs):
            made.append(kwargs)
            core = types.SimpleNamespace(shutdown=lambda: shut.append(True))
            self.llm_engine = types.SimpleNamespace(engine_core=core)

    fake.LLM, fake.SamplingParams = LLM, dict
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    vllm = dataclasses.replace(cfg.generation, backend="vllm", gpus_per_replica=1)
    replica = VLLMGenerator("ckpt", cfg.model, vllm, greedy=True, max_new_tokens=8, context=700)
    assert made[0]["max_model_len"] == 700 and "VLLM_BATCH_INVARIANT" not in os.environ  # off by default
    del replica  # what Ray Data's graceful actor exit does (__ray_shutdown__ drops the UDF)
    assert shut == [True]


def test_a_pool_whose_replicas_cannot_start_stops_with_the_setting(local_ray, cfg):
    from spd_ray.stages.generate import pool_started

    gen = dataclasses.replace(cfg.generation, gpus_per_replica=1, start_timeout_s=3)  # no GPU here
    ds = generate_dataset(ray.data.from_items([{"id": "0", "prompt": "x"}]), cfg.model, gen, context=64, greedy=True)
    with pytest.raises(RuntimeError, match=r"first 1 replicas \(0.5 CPUs, 1 GPUs each\) did not start in "
                                           r"generation.start_timeout_s=3 s"), pool_started(gen):
        ds.take_all()


@pytest.mark.faults
def test_stage1_a_killed_worker_is_replaced_and_the_statistics_are_the_same(local_ray, cfg, testbed_tokenizer,
                                                                             testbed_model, capfd):
    items = make_split("code", "calibration", 200)  # long enough to kill a worker mid-way
    batches, _ = calibration_batches(testbed_tokenizer, [it.text for it in items],
                                     [it.correctness_spans() for it in items], batch_size=1, max_length=256)
    layers = resolve_layers(testbed_model, None)
    local, _ = accumulate_kv_gradient_stats(testbed_model, batches, layers)
    killed = _kill_soon(b"ray::CalibrationWorker.accumulate")
    c = dataclasses.replace(cfg, calibration=dataclasses.replace(cfg.calibration, num_workers=2, max_failures=2))
    start = time.monotonic()
    summed, _, _ = distributed_kv_stats(c.model, c.calibration, batches, layers)
    print(f"faults: a calibration worker killed, stage 1 took {time.monotonic() - start:.0f} s")
    assert killed and "a calibration worker was lost" in capfd.readouterr().out
    assert_stats_close(summed, local)  # nothing counted twice, nothing missed
    assert_subspaces_close(build_subspace(summed), build_subspace(local))
