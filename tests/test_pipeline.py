"""The whole job at a small size: submitted with the real `ray job submit` to a real
`ray start --head` cluster (on local copies of the paper's benchmarks), and on a simulated
multi-node cluster (the embedded testbed, as a model with code of its own)."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import spd

from .hub_files import GSM8K_TRAIN, write_hub_files

ROOT = Path(__file__).resolve().parents[1]

SMALL = ["task.n_calibration=16", "task.n_train_prompts=32", "task.n_eval=8",
         "evaluation.domains=[math,code]", "generation.max_new_tokens=32",
         "evaluation.max_new_tokens=32", "finetune.epochs=1", "run.wandb.mode=offline"]
ARTIFACTS = ("config.yaml", "manifest.json", "subspace/subspace.safetensors", "subspace/subspace.json",
             "generations", "corpus.json", "model/config.json", "eval_base.json", "eval_spd.json", "metrics.json",
             "results.md", "wandb_id")


def _ray(*args, env, check=True, timeout=600):
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], env=env, check=check,
                          capture_output=True, text=True, timeout=timeout)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


@pytest.mark.slow
def test_job_submit_runs_the_pipeline_and_a_rerun_reuses_everything(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
           "OMP_NUM_THREADS": "1"}
    # A head of our own: its own temp dir (short, for Unix socket paths) and free ports, so that no
    # other Ray on this machine finds it, clashes with it or is stopped with it (`ray stop` stops all).
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    port, gcs_port, agent_port = _free_ports(3)
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             "--num-cpus=4", "--dashboard-host=127.0.0.1", f"--dashboard-port={port}",
                             f"--port={gcs_port}", f"--dashboard-agent-listen-port={agent_port}",
                             f"--temp-dir={temp_dir}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # it leads a process group of its node's processes
    try:
        for _ in range(120):  # written once the head is up
            if (temp_dir / "ray_current_cluster").exists() or head.poll() is not None:
                break
            time.sleep(1)
        assert head.poll() is None, "ray start --head exited"
        # the paper's benchmarks, read through the hub loaders from local copies in their schemas
        hub = ["task.source=hub", f"task.data_dir={write_hub_files(tmp_path / 'data')}",
               "task.n_calibration=3", "task.n_train_prompts=4"]  # GSM8K train has 7 rows here
        one_worker = ["calibration.num_workers=1", "generation.replicas_max=1", "finetune.num_workers=1"]
        submit = ["job", "submit", f"--address=http://127.0.0.1:{port}", "--working-dir", str(ROOT),
                  "--", sys.executable, "jobs/spd.py", *SMALL, *hub, *one_worker, f"run.output_dir={tmp_path}", "run.name=job"]
        for _ in range(10):  # a loaded machine can take a while to start the head's job agent
            first = _ray(*submit, env=env, check=False)
            if "No available agent to submit job" not in first.stderr:
                break
            time.sleep(10)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert "succeeded" in first.stdout + first.stderr
        run = tmp_path / "job"
        for name in ARTIFACTS:
            assert (run / name).exists(), name
        metrics = json.loads((run / "metrics.json").read_text())
        assert set(metrics["eval"]["base"]) == set(metrics["eval"]["spd"]) >= {"math/test/accuracy",
                                                                              "code/transfer/nll"}
        assert 0 <= metrics["corpus"]["1"]["accuracy"] <= 1 and metrics["corpus"]["1"]["n"] == 4
        # the testbed's full fine-tuning, saved in fp32 on CPU; no row is cut (the LoRA export's
        # share kept: tests/test_stage_finetune.py)
        assert metrics["finetune"]["1"]["export"] == {"dtype": "float32"}
        assert metrics["finetune"]["1"]["rows_cut"] == {"rows": 4, "prompt_cut": 0, "completion_cut": 0}
        prompts = pq.read_table(run / "generations").column("prompt").to_pylist()
        assert len(prompts) == 4 and all(any(r["question"] in p for r in GSM8K_TRAIN) for p in prompts)
        assert json.loads((run / "subspace/subspace.json").read_text())["meta"]["layers"] == [5, 3]
        assert "| math/test/accuracy |" in first.stdout

        again = _ray(*submit, env=env, check=False)
        assert again.returncode == 0, again.stdout[-3000:]
        # both evaluations, subspace, generations, corpus quality, model
        assert again.stdout.count("reusing") == 6
    finally:
        head.terminate()  # a graceful stop, then the group (the graceful stop alone can take 30 s)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_a_custom_code_model_runs_every_stage_spread_over_a_simulated_multi_node_cluster(tmp_path):
    """Two nodes, every stage on both; and the model comes with code of its own (config.json's
    auto_map), which `model.trust_remote_code` must carry to every worker on every node, through
    stages 1-3, both evaluations and the export."""
    import ray
    from ray.cluster_utils import Cluster

    from spd_ray.core.modeling import load_model

    from .tiny_models import custom_code_model

    model = custom_code_model(tmp_path / "model")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head takes no work
    nodes = {cluster.add_node(num_cpus=3).node_id, cluster.add_node(num_cpus=3).node_id}
    cluster.wait_for_nodes()
    # both replicas up before the first batch (ray#60124): else the first one may take every row
    context = ray.data.DataContext.get_current()
    waited, context.wait_for_min_actors_s = context.wait_for_min_actors_s, 120
    try:
        args = [*SMALL, f"run.output_dir={tmp_path}", "run.name=multi", f"run.ray_address={cluster.address}",
                f"model.path={model}", "model.trust_remote_code=true",
                "generation.replicas_min=2", "generation.replicas_max=2", "finetune.placement=SPREAD",
                "calibration.batch_size=4", "generation.batch_size=4", "evaluation.domains=[math]", "task.n_eval=4"]
        assert spd.main(args) == 0
        run = tmp_path / "multi"
        meta = json.loads((run / "subspace/subspace.json").read_text())["meta"]
        assert set(meta["worker_nodes"]) == nodes  # stage 1 on both nodes
        assert set(pq.read_table(run / "generations").column("node").to_pylist()) == nodes  # stage 2
        summary = json.loads((run / "model/train_summary.json").read_text())
        assert set(summary["nodes"]) == nodes  # stage 3
        assert summary["finished"] and summary["step"] == summary["total_steps"] > 0
    finally:
        context.wait_for_min_actors_s = waited
        ray.shutdown()
        cluster.shutdown()
    exported = json.loads((run / "model" / "config.json").read_text())
    assert exported["model_type"] == "spd_custom" and "auto_map" in exported
    assert (run / "model" / "modeling_spd_custom.py").exists()  # the export keeps its code
    assert set(json.loads((run / "metrics.json").read_text())["eval"]) == {"base", "spd"}  # both, with that code
    assert type(load_model(str(run / "model"), trust_remote_code=True)).__name__ == "SpdCustomForCausalLM"


def test_bad_config_is_a_clear_error_and_nothing_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/spd.py"), "subspace.rnak=3",
                           f"run.output_dir={tmp_path}"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown config key subspace.rnak" in proc.stderr and "rank_mode" in proc.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("override, words", [
    ("subspace.rank_mode=fixed subspace.rank=999", ["subspace.rank=999", "128 dimensions", "1..128"]),
    ("task.n_calibration=0", ["task.n_calibration=0", "calibration examples"]),
    ("task.n_train_prompts=0", ["task.n_train_prompts=0", "training prompts"]),
    ("calibration.layers=[9]", ["calibration.layers=[9]", "6 decoder layers"]),
])
def test_impossible_settings_are_errors_before_any_work(tmp_path, capfd, override, words):
    import ray

    assert spd.main([*override.split(), f"run.output_dir={tmp_path}/runs"]) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: ") and all(w in err for w in words), err
    assert not (tmp_path / "runs").exists() and not ray.is_initialized()  # no run folder, no Ray


def test_code_scoring_without_isolation_is_refused_before_anything_runs(tmp_path):
    # no bwrap on PATH: the embedded default scores code, so it stops at once, naming the fixes
    env = {**os.environ, "PATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/spd.py"), f"run.output_dir={tmp_path}/runs"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "bubblewrap (bwrap) is not installed" in proc.stderr and "apt-get install bubblewrap" in proc.stderr
    assert "evaluation.sandbox=process" in proc.stderr and not (tmp_path / "runs").exists()


def test_missing_model_path_is_a_clear_error(tmp_path, capfd):
    assert spd.main([f"model.path={tmp_path}/nomodel", f"run.output_dir={tmp_path}"]) == 2
    assert f"model.path={tmp_path}/nomodel: no such folder; set model.path=" in capfd.readouterr().err


def _parts(run: Path) -> set[str]:
    return {p.name for p in run.glob("generations.partial-*/part-*.parquet")}


def _kill_driver_when(args, env, ready, what: str) -> float:
    """Start the job, SIGKILL its driver (by pid) as soon as `ready()` holds; the seconds it ran."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    start = time.monotonic()
    try:
        while not ready() and proc.poll() is None and time.monotonic() < start + 600:
            time.sleep(0.2)
        assert ready(), f"{what} never happened (exit status {proc.poll()})"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return time.monotonic() - start
    finally:  # the local Ray it started, which outlives it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _mid_epoch_checkpoint(run: Path) -> int:
    """The step of stage 3's latest registered checkpoint (0: none yet)."""
    for snapshot in run.glob("model.resume-*/*-finetune/checkpoint_manager_snapshot.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
            return json.loads(snapshot.read_text())["checkpoint_results"][-1]["metrics"]["step"]
    return 0


@pytest.mark.slow
@pytest.mark.faults
def test_a_driver_killed_in_stage2_and_in_stage3_loses_only_unfinished_work(tmp_path):
    args = [sys.executable, str(ROOT / "jobs/spd.py"), *SMALL, "evaluation.domains=[math]", "task.n_eval=4",
            "generation.batch_size=4", "generation.batches_per_call=1", "generation.replicas_max=1", "finetune.batch_size=4",
            "finetune.checkpoint_every_steps=1",  # 32 rows / 2 workers / 4: 4 steps, each checkpointed
            "run.name=cut", f"run.output_dir={tmp_path}"]
    run = tmp_path / "cut"
    # each driver its own W&B service, as on a cluster (not the one this test process may hold)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    t_cut2 = _kill_driver_when(args, env, lambda: len(_parts(run)) >= 2, "stage 2 writing a part")
    before = _parts(run)
    # the rerun keeps those parts, generates the rest, and is killed once stage 3 has checkpointed
    t_cut3 = _kill_driver_when(args, env, lambda: 0 < _mid_epoch_checkpoint(run) < 4, "a stage 3 checkpoint")  # of 4
    step_at_kill = _mid_epoch_checkpoint(run)
    parts = sorted((run / "generations").glob("part-*.parquet"))
    assert before <= {p.name for p in parts}  # the parts written before the first kill were kept
    ids = [i for p in parts for i in pq.read_table(p, columns=["id"])["id"].to_pylist()]
    assert sorted(ids) == sorted(f"{i}-0" for i in range(32))  # every row exactly once
    start = time.monotonic()
    last = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    assert re.search(r"generations: reusing", last.stdout)  # stage 2 is not done again
    summary = json.loads((run / "model" / "train_summary.json").read_text())
    history = [json.loads(line) for line in (run / "model" / "train_history.jsonl").read_text().splitlines()]
    assert 0 < summary["start_step"] < summary["total_steps"] and summary["finished"]  # resumed mid-epoch
    assert f"stage 3: resuming at step {summary['start_step']} of {summary['total_steps']}" in last.stdout
    assert [h["step"] for h in history] == list(range(1, summary["total_steps"] + 1))  # none lost or twice
    assert (run / "eval_spd.json").exists()
    print(f"faults: stage 2 cut after {t_cut2:.0f} s ({len(before)} parts kept), stage 3 cut after "
          f"{t_cut3:.0f} s (checkpoint at step {step_at_kill}, resumed at {summary['start_step']} of "
          f"{summary['total_steps']}), last run {time.monotonic() - start:.0f} s")
