"""Checks against the cluster, once Ray is connected and before any stage (`preflight`): what
each stage asks for (CPUs and GPUs per worker, and in all) against what the cluster has or its
autoscaler can add (a request that cannot be placed waits forever), GPU settings that would
crowd every replica onto GPU 0, and a run folder that every node sees, now and once the
autoscaler adds nodes. Each problem is a ConfigError naming the setting and the fix.
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray
import ray._private.state
import yaml
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from spd_ray import console
from spd_ray.config import ConfigError, SPDConfig

# Where `ray up` puts the launcher's cluster config on the head node (ray/autoscaler/_private/
# commands.py), which the head's monitor runs the autoscaler from; Ray's own dashboard and Tune
# read it there too (dashboard/modules/usage_stats/usage_stats_head.py, tune/execution/cluster_info.py)
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"
# set by the KubeRay operator in every Ray container (ray/_common/usage/usage_constants.py)
KUBERAY_ENV = "RAY_USAGE_STATS_KUBERAY_IN_USE"


@dataclass(frozen=True)
class Capacity:
    """What the cluster can give: CPUs and GPUs in all, and the (CPUs, GPUs) of each kind of
    node, which one worker must fit in. `source` says where the figures come from: "nodes" (the
    nodes there now), "launcher" (the cluster launcher's config on the head: its node types up
    to their max_workers) or "gcs" (the autoscaler's cluster config in the GCS). `may_grow`: an
    autoscaler may add nodes beyond these figures, and Ray does not tell its maximum (KubeRay)."""
    cpus: float
    gpus: float
    nodes: tuple[tuple[float, float], ...]
    source: str = "nodes"
    may_grow: bool = False

    @property
    def where(self) -> str:
        return {"nodes": "", "launcher": " at the autoscaler's maximum (launcher config)",
                "gcs": " at the autoscaler's maximum (cluster config)"}[self.source]

    @property
    def can_grow(self) -> bool:
        """Whether nodes may join beyond those there now (an autoscaler's node types)."""
        return self.may_grow or self.source != "nodes"


def _shapes(resources: list[dict]) -> tuple[tuple[float, float], ...]:
    return tuple(sorted({(float(r.get("CPU", 0)), float(r.get("GPU", 0))) for r in resources}))


def launcher_maximum(config: dict) -> tuple[float, float, list[dict]]:
    """The most CPUs and GPUs a launcher cluster config (`ray up`'s YAML) can reach, and the
    resources of its node types: the head, plus at most `max_workers` workers in all, each type
    at most its own `max_workers` (the autoscaler's limits), filled with the largest first."""
    types = config.get("available_node_types") or {}
    head = types.get(config.get("head_node_type"), {}).get("resources") or {}
    room = config.get("max_workers")
    workers = [(t.get("resources") or {}, t.get("max_workers", room) or 0)
               for name, t in types.items() if name != config.get("head_node_type")]
    room = sum(n for _, n in workers) if room is None else room

    def most(key: str) -> float:
        total, left = float(head.get(key, 0)), room
        for resources, count in sorted(workers, key=lambda w: -w[0].get(key, 0)):
            take = min(count, left)
            total, left = total + take * resources.get(key, 0), left - take
        return total

    return most("CPU"), most("GPU"), [head, *(r for r, n in workers if n)]


@ray.remote(num_cpus=0, max_retries=0)
def _read(path: str) -> str | None:
    try:
        return Path(path).expanduser().read_text()
    except OSError:
        return None


def _read_on_head(path: str) -> str | None:
    """`path` (~: the head's home) read on the head node, where the launcher keeps its config
    and where the driver of a submitted job need not be."""
    head = next((n for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]), None)
    if head is None:
        return None
    strategy = NodeAffinitySchedulingStrategy(head["NodeID"], soft=False)
    return ray.get(_read.options(scheduling_strategy=strategy).remote(path), timeout=60)


def _gcs_maximum() -> tuple[float, float, list[dict]] | None:
    """The maximum in the autoscaler's cluster config in the GCS, which Ray Data and Train read
    (`ray._private.state`); Ray 2.60's own autoscalers do not write it (no caller of
    report_cluster_config), a platform may."""
    try:
        state = ray._private.state.state
        config = state.get_cluster_config()
        most = state.get_max_resources_from_cluster_config() if config else None
    except Exception:  # a private API: absent or changed, the other sources answer
        return None
    if not most:
        return None
    groups = [dict(g.resources) for g in config.node_group_configs if g.max_count]
    return float(most.get("CPU", 0)), float(most.get("GPU", 0)), groups


def cluster_capacity() -> Capacity:
    """The nodes there now, raised to the autoscaler's maximum where Ray has one to read: the
    launcher's config on the head (`ray up` clusters), else the GCS's cluster config. Without
    either, a KubeRay cluster may still grow (`may_grow`): its maximum is in the RayCluster
    resource, which the job cannot read."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    now = Capacity(sum(r.get("CPU", 0) for r in nodes), sum(r.get("GPU", 0) for r in nodes), _shapes(nodes))
    text = _read_on_head(LAUNCHER_CONFIG)
    try:
        launcher = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        launcher = None
    found, source = (launcher_maximum(launcher), "launcher") if isinstance(launcher, dict) else (_gcs_maximum(), "gcs")
    if found is None:
        return Capacity(now.cpus, now.gpus, now.nodes, may_grow=os.environ.get(KUBERAY_ENV) == "1")
    cpus, gpus, types = found
    return Capacity(max(now.cpus, cpus), max(now.gpus, gpus), _shapes([*nodes, *types]), source)


@dataclass(frozen=True)
class Ask:
    """What one stage holds at once: `workers` of `cpus` and `gpus` each; `setting` sets the
    number of workers."""
    stage: str
    workers: int
    cpus: float
    gpus: float
    setting: str


def stage_asks(cfg: SPDConfig) -> list[Ask]:
    """Each stage's ask of `cfg`; the stages run one after the other."""
    c, g, f = cfg.calibration, cfg.generation, cfg.finetune
    asks = []
    if g.project or cfg.evaluation.project:
        batches = math.ceil(max(1, cfg.task.n_calibration) / c.batch_size)
        workers = c.num_workers if c.zero_stage == 3 else min(c.num_workers, batches)
        asks.append(Ask("stage 1", workers, c.cpus_per_worker, c.gpus_per_worker, "calibration.num_workers"))
    asks.append(Ask("stage 2 and evaluation", g.replicas_min, g.cpus_per_replica, g.gpus_per_replica,
                    "generation.replicas_min"))
    asks.append(Ask("stage 3", f.num_workers, f.cpus_per_worker, float(f.use_gpu), "finetune.num_workers"))
    return asks


def _problem(ask: Ask, capacity: Capacity) -> str | None:
    """Why `ask` cannot be placed on `capacity`, naming the setting to change; None if it can."""
    if ask.gpus and not capacity.gpus:
        return (f"{ask.stage} needs {ask.workers * ask.gpus:g} GPUs, the cluster has 0: use the CPU "
                "settings (model.device=cpu calibration.gpus_per_worker=0 "
                "generation.gpus_per_replica=0 finetune.use_gpu=false), or add GPU nodes")
    if not any(cpus >= ask.cpus and gpus >= ask.gpus for cpus, gpus in capacity.nodes):
        cpus, gpus = max(capacity.nodes, key=lambda n: (n[1], n[0]) if ask.gpus else n, default=(0, 0))
        return (f"{ask.stage} asks {ask.cpus:g} CPUs and {ask.gpus:g} GPUs per worker and no node "
                f"has that (the largest: {cpus:g} CPUs, {gpus:g} GPUs): lower its CPUs or GPUs per "
                "worker, or add larger nodes")
    for kind, per, have in [("GPUs", ask.gpus, capacity.gpus), ("CPUs", ask.cpus, capacity.cpus)]:
        if per and ask.workers * per > have:
            return (f"{ask.stage} needs {ask.workers * per:g} {kind} ({ask.workers} x {per:g}), the "
                    f"cluster has {have:g}{capacity.where}: set {ask.setting}={int(have // per)}, "
                    "or add nodes")
    return None


def check_resources(cfg: SPDConfig, capacity: Capacity) -> None:
    """Each stage's workers fit the cluster (each on one node, and all of them at once), and no
    stage runs GPU work without reserving its GPU. Where an autoscaler may add nodes of a size
    Ray does not tell (`capacity.may_grow`), a misfit is a warning: the stage's own timeout
    (calibration.placement_timeout_s, generation.start_timeout_s) ends it with the fix."""
    for ask in stage_asks(cfg):
        if not ask.workers or not (ask.cpus or ask.gpus):
            continue
        problem = _problem(ask, capacity)
        if problem and capacity.may_grow:
            console.warn(f"{problem} (the nodes there now; the autoscaler may add more)")
        elif problem:
            raise ConfigError(problem)
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


def nodes_not_seeing(path: Path, text: str, timeout_s: float = 300) -> list[str]:
    """The IPs of the alive nodes on which `path` does not hold `text` (a task on each)."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    seen = ray.get([_read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(str(path)) for n in nodes], timeout=timeout_s)
    return [n["NodeManagerAddress"] for n, s in zip(nodes, seen) if s != text]


# file systems that live on one machine: a run folder on one of them is not seen by other nodes
LOCAL_FILESYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "vfat", "tmpfs",
                     "ramfs", "overlay"}


def filesystem_type(path: Path, mounts: str | None = None) -> str | None:
    """The type of the file system `path` is on: that of its longest mount point in
    /proc/mounts (`mounts`: that file's text); None where there is no such file."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    best, kind = -1, None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = Path(fields[1].replace("\\040", " "))
        if (path == point or point in path.parents) and len(point.parts) > best:
            best, kind = len(point.parts), fields[2]
    return kind


def check_shared_storage(output_dir: str | Path, can_grow: bool = False) -> None:
    """`output_dir` is the same folder on every node: a marker the driver writes there is read
    back by a task on each node (a folder local to each node would fail deep in stage 3, or
    silently leave each node its own copies). Where an autoscaler may add nodes (`can_grow`:
    the shipped clusters start with the head alone), the folder must also not be on a file
    system local to this machine."""
    folder = Path(output_dir).resolve()
    fix = ("mount one NFS/EFS/Filestore folder at the same path on every node "
           "(cluster/README.md) and pass run.output_dir=<that path>")
    kind = filesystem_type(folder) if can_grow else None
    if kind in LOCAL_FILESYSTEMS:
        raise ConfigError(f"run.output_dir must be shared storage on a cluster: {folder} is on a "
                          f"{kind} file system local to this node, which the nodes the autoscaler "
                          f"adds will not see; {fix}")
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
                          f"the nodes {', '.join(missing)}; {fix}")


def preflight(*cfgs: SPDConfig) -> None:
    """The cluster checks of every config to be run (a comparison runs many), before any stage."""
    capacity = cluster_capacity()
    for cfg in cfgs:
        check_resources(cfg, capacity)
    for output_dir in dict.fromkeys(str(Path(c.run.output_dir).resolve()) for c in cfgs):
        check_shared_storage(output_dir, capacity.can_grow)
