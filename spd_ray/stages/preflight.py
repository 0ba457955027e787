"""Checks against the cluster, once Ray is connected and before any stage (`preflight`): what
each stage asks for against what the cluster has or its autoscaler can add (a request that
cannot be placed waits forever), GPU settings that would crowd every replica onto GPU 0, and a
run folder that every node sees. Each problem is a ConfigError naming the setting and the fix.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray
import ray._private.state
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from spd_ray.config import ConfigError, SPDConfig


@dataclass
class Capacity:
    """The GPUs of the cluster: in all, and on its largest node; `autoscaled` says whether the
    figures are what the autoscaler's node types can reach (else: the nodes there now)."""
    gpus: float
    gpus_per_node: float
    autoscaled: bool

    def __str__(self) -> str:
        return f"{self.gpus:g}" + (" (at the autoscaler's maximum)" if self.autoscaled else "")


def cluster_capacity() -> Capacity:
    """The GPUs there now, or the autoscaler's maximum where its cluster config says more.
    Ray 2.60 has no public API for that maximum: it is read as Ray Data reads it
    (`ray._private.state`), and left out where Ray has none (a local Ray, KubeRay v1)."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    now = Capacity(sum(r.get("GPU", 0) for r in nodes), max((r.get("GPU", 0) for r in nodes),
                                                           default=0), False)
    try:
        state = ray._private.state.state
        config = state.get_cluster_config()
        most = (state.get_max_resources_from_cluster_config() or {}).get("GPU", 0)
        groups = [g.resources.get("GPU", 0) for g in config.node_group_configs if g.max_count] if config else []
    except Exception:  # a private API: absent or changed, the nodes there now are the answer
        return now
    if most <= now.gpus:
        return now
    return Capacity(most, max(now.gpus_per_node, *groups), True)


def gpu_asks(cfg: SPDConfig) -> list[tuple[str, int, float, str]]:
    """(stage, workers, GPUs per worker, the setting of the number of workers) of each stage
    of `cfg` that uses GPUs; each stage holds its workers all at once, the stages one after
    the other."""
    c, g, f = cfg.calibration, cfg.generation, cfg.finetune
    asks = []
    if g.project or cfg.evaluation.project:
        batches = math.ceil(max(1, cfg.task.n_calibration) / c.batch_size)
        workers = c.num_workers if c.zero_stage == 3 else min(c.num_workers, batches)
        asks.append(("stage 1", workers, c.gpus_per_worker, "calibration.num_workers"))
    asks.append(("stage 2 and evaluation", g.replicas_min, g.gpus_per_replica, "generation.replicas_min"))
    if f.use_gpu:
        asks.append(("stage 3", f.num_workers, 1.0, "finetune.num_workers"))
    return [a for a in asks if a[2] > 0]


def check_gpus(cfg: SPDConfig, capacity: Capacity) -> None:
    """Each stage's GPUs fit the cluster (in all and per worker on one node), and no stage runs
    GPU work without reserving its GPU."""
    for stage, workers, per_worker, setting in gpu_asks(cfg):
        need = workers * per_worker
        if not capacity.gpus:
            raise ConfigError(f"{stage} needs {need:g} GPUs, the cluster has 0: use the CPU settings "
                              "(model.device=cpu calibration.gpus_per_worker=0 "
                              "generation.gpus_per_replica=0 finetune.use_gpu=false), or add GPU nodes")
        if per_worker > capacity.gpus_per_node:
            raise ConfigError(f"{stage} asks {per_worker:g} GPUs per worker and the largest node has "
                              f"{capacity.gpus_per_node:g}: lower its GPUs per worker, or add larger "
                              "GPU nodes")
        if need > capacity.gpus:
            raise ConfigError(f"{stage} needs {need:g} GPUs ({workers} x {per_worker:g}), the cluster "
                              f"has {capacity}: set {setting}={int(capacity.gpus // per_worker)}, "
                              "or add GPU nodes")
    if capacity.gpus and cfg.model.device != "cpu":
        _check_reserved(cfg)


def _check_reserved(cfg: SPDConfig) -> None:
    """On a cluster with GPUs, a worker that reserves none still sees every GPU of its node (Ray
    leaves CUDA_VISIBLE_DEVICES alone at 0 GPUs) and model.device auto/cuda puts it on cuda:0."""
    unreserved = [("generation.gpus_per_replica", cfg.generation.gpus_per_replica)]
    if cfg.calibration.zero_stage == 0 and (cfg.generation.project or cfg.evaluation.project):
        unreserved.append(("calibration.gpus_per_worker", cfg.calibration.gpus_per_worker))
    for setting, value in unreserved:
        if value == 0:
            raise ConfigError(f"{setting}=0 with model.device={cfg.model.device} on a cluster with "
                              "GPUs: every such worker would load its model on cuda:0 of its node, "
                              f"unreserved; set {setting}=1 (or model.device=cpu to stay on CPUs)")


@ray.remote(num_cpus=0, max_retries=0)
def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def nodes_not_seeing(path: Path, text: str, timeout_s: float = 300) -> list[str]:
    """The IPs of the alive nodes on which `path` does not hold `text` (a task on each)."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    seen = ray.get([_read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(str(path)) for n in nodes], timeout=timeout_s)
    return [n["NodeManagerAddress"] for n, s in zip(nodes, seen) if s != text]


def check_shared_storage(output_dir: str | Path) -> None:
    """`output_dir` is the same folder on every node: a marker the driver writes there is read
    back by a task on each node (a folder local to each node would fail deep in stage 3, or
    silently leave each node its own copies)."""
    folder = Path(output_dir).resolve()
    if len([n for n in ray.nodes() if n["Alive"]]) < 2:
        return
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = folder / f".spd-preflight-{token}"
    marker.write_text(token)
    try:
        missing = nodes_not_seeing(marker, token)
    finally:
        marker.unlink(missing_ok=True)
    if missing:
        raise ConfigError(f"run.output_dir must be shared storage: {folder} is not the same folder on "
                          f"the nodes {', '.join(missing)}; mount one NFS/EFS/Filestore folder at the "
                          "same path on every node (cluster/README.md) and pass "
                          "run.output_dir=<that path>")


def preflight(*cfgs: SPDConfig) -> None:
    """The cluster checks of every config to be run (a comparison runs many), before any stage."""
    capacity = cluster_capacity()
    for cfg in cfgs:
        check_gpus(cfg, capacity)
    for output_dir in dict.fromkeys(str(Path(c.run.output_dir).resolve()) for c in cfgs):
        check_shared_storage(output_dir)
