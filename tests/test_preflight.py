"""The cluster checks before any stage (spd_ray.stages.preflight), on fake GPU counts: a plain
config check for each problem, and a local Ray (`ray.init(num_gpus=1)` fakes a GPU on CPU) or a
simulated two-node cluster for what reads the cluster itself; the autoscaler's maximum from a fake
of each source Ray 2.60 has (the launcher's config on the head, the GCS's cluster config) and
none (KubeRay)."""

import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
import yaml

from spd_ray.config import ConfigError, SPDConfig, load_config
from spd_ray.stages import preflight
from spd_ray.stages.calibrate import distributed_kv_stats
from spd_ray.stages.preflight import Capacity, check_resources, cluster_capacity, launcher_maximum

ROOT = Path(__file__).resolve().parents[1]
PAPER_8B = ROOT / "configs/paper/llama3.1-8b-gsm8k.yaml"
ONE_GPU = Capacity(cpus=16, gpus=1, nodes=((16, 1),))


@pytest.mark.parametrize("overrides, message", [
    ([], "stage 1 needs 2 GPUs (2 x 1), the cluster has 1: set calibration.num_workers=1"),
    (["finetune.num_workers=1", "calibration.num_workers=1", "finetune.cpus_per_worker=32"],
     "stage 3 asks 32 CPUs and 1 GPUs per worker and no node has that (the largest: 16 CPUs, 1 GPUs)"),
    (["finetune.num_workers=1", "calibration.num_workers=1", "generation.replicas_min=1",
      "generation.cpus_per_replica=12", "generation.gpus_per_replica=0", "model.device=cpu",
      "calibration.gpus_per_worker=0", "calibration.cpus_per_worker=12", "calibration.num_workers=2"],
     "stage 1 needs 24 CPUs (2 x 12), the cluster has 16: set calibration.num_workers=1"),
    (["calibration.num_workers=1"], "stage 3 needs 4 GPUs (4 x 1), the cluster has 1: set finetune.num_workers=1"),
    (["finetune.num_workers=1", "calibration.num_workers=1", "generation.replicas_min=2"],
     "stage 2 and evaluation needs 2 GPUs (2 x 1), the cluster has 1: set generation.replicas_min=1"),
    (["finetune.num_workers=1", "calibration.num_workers=1", "generation.gpus_per_replica=2",
      "generation.tensor_parallel_size=2"], "asks 4 CPUs and 2 GPUs per worker and no node has that (the largest: 16 CPUs, 1 GPUs)"),
])
def test_a_paper_config_on_one_gpu_names_the_setting_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_resources(load_config(PAPER_8B, overrides), ONE_GPU)


def test_what_fits_passes_and_no_gpus_points_at_the_cpu_settings():
    fits = ["finetune.num_workers=1", "calibration.num_workers=1"]
    check_resources(load_config(PAPER_8B, fits), ONE_GPU)
    check_resources(load_config(PAPER_8B), Capacity(cpus=96, gpus=8, nodes=((48, 4),), source="launcher"))
    with pytest.raises(ConfigError, match="the cluster has 0: use the CPU settings"):
        check_resources(load_config(PAPER_8B, fits), Capacity(16, 0, ((16, 0),)))
    check_resources(SPDConfig(), Capacity(2, 0, ((2, 0),)))  # the CPU defaults on a CPU cluster
    with pytest.raises(ConfigError, match=r"stage 1 needs 2 CPUs \(2 x 1\), the cluster has 1: set calibration.num_workers=1"):
        check_resources(SPDConfig(), Capacity(1, 0, ((1, 0),)))  # a pool that could never start


def test_gpu_work_without_a_reserved_gpu_is_refused_on_a_gpu_cluster():
    cfg = SPDConfig()  # model.device=auto, 0 GPUs per replica and worker: cuda:0 for all
    cfg.calibration.num_workers = 1
    with pytest.raises(ConfigError, match="generation.gpus_per_replica=0 with model.device=auto"):
        check_resources(cfg, ONE_GPU)
    cfg.generation.gpus_per_replica = 1
    with pytest.raises(ConfigError, match="set calibration.gpus_per_worker=1"):
        check_resources(cfg, ONE_GPU)
    cfg.calibration.gpus_per_worker = 1
    check_resources(cfg, ONE_GPU)
    cpu = SPDConfig()
    cpu.model.device = "cpu"  # on CPUs by choice
    check_resources(cpu, ONE_GPU)


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
    ray.init(address="local", num_cpus=8, num_gpus=1, include_dashboard=False)  # a fake GPU: a count only
    yield
    ray.shutdown()


def test_the_launcher_maximum_of_the_shipped_cluster_files():
    """cluster/aws.yaml: 8 workers at most, the two 8-GPU p4d first, then six 4-GPU g5 nodes."""
    cpus, gpus, types = launcher_maximum(yaml.safe_load((ROOT / "cluster/aws.yaml").read_text()))
    assert (cpus, gpus) == (2 * 96 + 6 * 48, 2 * 8 + 6 * 4)
    assert {(t.get("CPU", 0), t.get("GPU", 0)) for t in types} == {(0, 0), (48, 4), (96, 8)}
    cpus, gpus, _ = launcher_maximum(yaml.safe_load((ROOT / "cluster/gcp.yaml").read_text()))
    assert gpus > 4  # more than one node's worth: the 4-GPU stage 3 fits


@pytest.fixture()
def a_head_with_no_gpus():
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # as the shipped clusters start: the head alone
    yield
    ray.shutdown()


def test_the_autoscalers_maximum_from_the_launchers_config_on_the_head(a_head_with_no_gpus, tmp_path,
                                                                       monkeypatch):
    assert cluster_capacity() == Capacity(2, 0, ((2, 0),))  # no autoscaler: the nodes there now
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"  # what `ray up cluster/aws.yaml` leaves there
    bootstrap.write_text((ROOT / "cluster/aws.yaml").read_text())
    monkeypatch.setattr(preflight, "LAUNCHER_CONFIG", str(bootstrap))
    capacity = cluster_capacity()
    assert (capacity.source, capacity.gpus, capacity.can_grow) == ("launcher", 40, True)
    check_resources(load_config(PAPER_8B), capacity)  # the 4-GPU stage 3 is not refused
    with pytest.raises(ConfigError, match=r"needs 48 GPUs \(48 x 1\), the cluster has 40 at the "
                                          r"autoscaler's maximum \(launcher config\)"):
        check_resources(load_config(PAPER_8B, ["finetune.num_workers=48"]), capacity)


def test_the_autoscalers_maximum_from_the_gcs_cluster_config(a_head_with_no_gpus):
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_put

    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add(name="gpu", max_count=4)
    group.resources.update({"CPU": 8, "GPU": 1})
    _internal_kv_put(ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, config.SerializeToString(),
                     namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE)
    capacity = cluster_capacity()
    assert (capacity.source, capacity.cpus, capacity.gpus) == ("gcs", 32, 4)
    assert capacity.nodes == ((2, 0), (8, 1))
    one_gpu = ["finetune.cpus_per_worker=8", "generation.cpus_per_replica=8", "calibration.cpus_per_worker=8"]
    check_resources(load_config(PAPER_8B, one_gpu), capacity)
    with pytest.raises(ConfigError, match="asks 4 CPUs and 2 GPUs per worker and no node has that"):
        check_resources(load_config(PAPER_8B, ["generation.gpus_per_replica=2",
                                               "generation.tensor_parallel_size=2"]), capacity)


def test_kuberay_whose_maximum_the_job_cannot_read_warns_instead_of_refusing(a_head_with_no_gpus, tmp_path,
                                                                           monkeypatch, capsys):
    with pytest.raises(ConfigError, match="stage 1 needs 2 GPUs, the cluster has 0"):
        preflight.preflight(load_config(PAPER_8B, [f"run.output_dir={tmp_path}"]))  # no autoscaler
    monkeypatch.setenv(preflight.KUBERAY_ENV, "1")  # what the KubeRay operator sets in its pods
    monkeypatch.setattr(preflight, "filesystem_type", lambda path: "nfs4")  # its shared volume
    capacity = cluster_capacity()
    assert capacity.may_grow and capacity.can_grow and capacity.gpus == 0
    preflight.preflight(load_config(PAPER_8B, [f"run.output_dir={tmp_path}"]))
    assert "warning: stage 1 needs 2 GPUs, the cluster has 0" in capsys.readouterr().out


def test_a_run_folder_on_a_local_disk_is_refused_where_the_cluster_can_grow(tmp_path, monkeypatch):
    mounts = "overlay / overlay rw 0 0\n/dev/nvme1 /mnt/data ext4 rw 0 0\nfs-1:/ /mnt/shared nfs4 rw 0 0\n"
    assert preflight.filesystem_type(Path("/mnt/shared/spd-runs"), mounts) == "nfs4"
    assert preflight.filesystem_type(Path("/mnt/data/runs"), mounts) == "ext4"
    assert preflight.filesystem_type(Path("/home/ubuntu/runs"), mounts) == "overlay"
    monkeypatch.setattr(preflight, "filesystem_type", lambda path: "ext4")
    with pytest.raises(ConfigError, match="must be shared storage on a cluster: .* on a ext4 file "
                                          "system local to this node"):
        preflight.check_shared_storage(tmp_path, can_grow=True)
    with ray.init(address="local", num_cpus=1, include_dashboard=False):
        preflight.check_shared_storage(tmp_path, can_grow=False)  # a fixed one-node cluster: fine
        monkeypatch.setattr(preflight, "filesystem_type", lambda path: "nfs4")
        preflight.check_shared_storage(tmp_path, can_grow=True)


def test_the_cluster_capacity_and_preflight_on_a_local_ray(one_gpu_ray, tmp_path):
    assert cluster_capacity() == Capacity(8, 1, ((8, 1),))  # a local Ray has no autoscaler config
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
