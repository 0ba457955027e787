"""The cluster checks before any stage (spd_ray.stages.preflight), on fake GPU counts: a plain
config check for each problem, and a local Ray (`ray.init(num_gpus=1)` fakes a GPU on CPU) or a
simulated two-node cluster for what reads the cluster itself."""

import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch

from spd_ray.config import ConfigError, SPDConfig, load_config
from spd_ray.stages import preflight
from spd_ray.stages.calibrate import distributed_kv_stats
from spd_ray.stages.preflight import Capacity, check_gpus, cluster_capacity

ROOT = Path(__file__).resolve().parents[1]
PAPER_8B = ROOT / "configs/paper/llama3.1-8b-gsm8k.yaml"
ONE_GPU = Capacity(gpus=1, gpus_per_node=1, autoscaled=False)


@pytest.mark.parametrize("overrides, message", [
    ([], "stage 1 needs 2 GPUs (2 x 1), the cluster has 1: set calibration.num_workers=1"),
    (["calibration.num_workers=1"], "stage 3 needs 4 GPUs (4 x 1), the cluster has 1: set finetune.num_workers=1"),
    (["finetune.num_workers=1", "calibration.num_workers=1", "generation.replicas_min=2"],
     "stage 2 and evaluation needs 2 GPUs (2 x 1), the cluster has 1: set generation.replicas_min=1"),
    (["finetune.num_workers=1", "calibration.num_workers=1", "generation.gpus_per_replica=2",
      "generation.tensor_parallel_size=2"], "asks 2 GPUs per worker and the largest node has 1"),
])
def test_a_paper_config_on_one_gpu_names_the_setting_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_gpus(load_config(PAPER_8B, overrides), ONE_GPU)


def test_what_fits_passes_and_no_gpus_points_at_the_cpu_settings():
    fits = ["finetune.num_workers=1", "calibration.num_workers=1"]
    check_gpus(load_config(PAPER_8B, fits), ONE_GPU)
    check_gpus(load_config(PAPER_8B), Capacity(gpus=8, gpus_per_node=4, autoscaled=True))
    with pytest.raises(ConfigError, match="the cluster has 0: use the CPU settings"):
        check_gpus(load_config(PAPER_8B, fits), Capacity(0, 0, False))
    check_gpus(SPDConfig(), Capacity(0, 0, False))  # the CPU defaults on a CPU cluster


def test_gpu_work_without_a_reserved_gpu_is_refused_on_a_gpu_cluster():
    cfg = SPDConfig()  # model.device=auto, 0 GPUs per replica and worker: cuda:0 for all
    cfg.calibration.num_workers = 1
    with pytest.raises(ConfigError, match="generation.gpus_per_replica=0 with model.device=auto"):
        check_gpus(cfg, ONE_GPU)
    cfg.generation.gpus_per_replica = 1
    with pytest.raises(ConfigError, match="set calibration.gpus_per_worker=1"):
        check_gpus(cfg, ONE_GPU)
    cfg.calibration.gpus_per_worker = 1
    check_gpus(cfg, ONE_GPU)
    cpu = SPDConfig()
    cpu.model.device = "cpu"  # on CPUs by choice
    check_gpus(cpu, ONE_GPU)


def test_the_run_folder_must_be_the_same_on_every_node(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # tasks of 0 CPUs run there too
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        preflight.check_shared_storage(tmp_path)  # one machine: the folder is shared
        assert list(tmp_path.iterdir()) == []  # the marker is gone
        # a folder some nodes lack: each node is asked
        assert len(preflight.nodes_not_seeing(tmp_path / "absent", "x")) == 2
        monkeypatch.setattr(preflight, "nodes_not_seeing", lambda path, text: ["10.0.0.7"])
        with pytest.raises(ConfigError, match="run.output_dir must be shared storage: .* on the nodes 10.0.0.7"):
            preflight.check_shared_storage(tmp_path)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def one_gpu_ray():
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False)  # a fake GPU: a count only
    yield
    ray.shutdown()


def test_the_cluster_capacity_and_preflight_on_a_local_ray(one_gpu_ray, tmp_path):
    assert cluster_capacity() == ONE_GPU  # a local Ray has no autoscaler config
    with pytest.raises(ConfigError, match="stage 3 needs 4 GPUs"):
        preflight.preflight(load_config(PAPER_8B, [f"run.output_dir={tmp_path}", "calibration.num_workers=1"]))
    preflight.preflight(load_config(PAPER_8B, [f"run.output_dir={tmp_path}", "finetune.num_workers=1",
                                               "calibration.num_workers=1"]))


def test_a_placement_group_that_cannot_be_placed_times_out_with_the_fix(one_gpu_ray, testbed_model_path):
    cfg = SPDConfig()
    cfg.model.path = testbed_model_path
    cfg.calibration.num_workers, cfg.calibration.gpus_per_worker = 2, 1
    cfg.calibration.placement_timeout_s = 1
    batches = [{"input_ids": torch.zeros(1, 2, dtype=torch.long)}] * 2
    with pytest.raises(RuntimeError, match=r"waited 1 s for 2 calibration workers .* set calibration.num_workers=1"):
        distributed_kv_stats(cfg.model, cfg.calibration, batches, [0])


def test_the_job_stops_at_the_preflight_before_any_stage(tmp_path):
    """jobs/spd.py on this machine's CPU Ray with a GPU setting: `error:` and exit 2, nothing made."""
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/spd.py"), "generation.gpus_per_replica=1",
                           f"run.output_dir={tmp_path}", "run.name=gpu", "run.wandb.enabled=false"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    shown = proc.stdout + proc.stderr  # the console: stderr is the driver log once it is open
    assert "error: stage 2 and evaluation needs 1 GPUs, the cluster has 0: use the CPU settings" in shown
    assert "Traceback" not in shown
    assert not [p.name for p in (tmp_path / "gpu").iterdir() if p.name not in ("logs", "config.yaml")]
