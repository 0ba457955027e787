"""Stage 1 on Ray: the calibration batches are sharded over workers; each worker returns the
sufficient statistics of its shard, the driver sums them and computes the capability subspace
once (the sum is exact: docs/method.md, "Sufficient statistics").

`calibration.zero_stage`: 0 gives every worker a full replica (spread over nodes); 3 (models too
large for one device) makes the workers one torch.distributed group (gloo on CPU, NCCL with one
GPU each, packed onto as few nodes as hold them, each rank seeing its node's GPUs of the group)
that holds one ZeRO-3-partitioned model. Rank 0 offers its node IP and a free port as rendezvous, as
Ray Train's torch backend does; plain actors rather than a TorchTrainer, because statistics come
back as return values (Train returns only reported metrics and checkpoints) and the placement
group is shared with the replica path. Each rank's DeepSpeed is a `DeepSpeedStrategy`
(`spd_ray.stages.deepspeed`, shared with stage 3), in the precision of `model.dtype` (auto: bf16
on GPU, fp32 on CPU); its engine, without an optimizer (ZeRO-3 inference), gathers each module's
parameters for its forward and backward. Those gathers are collectives, so every rank runs one
pass per batch and the shorter shards add padding passes whose statistics are dropped.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from spd_ray import console, data
from spd_ray.config import CalibrationConfig, ModelConfig, SubspaceConfig
from spd_ray.core.activations import accumulate_kv_activation_stats
from spd_ray.core.gradients import accumulate_kv_gradient_stats
from spd_ray.core.modeling import load_model, load_tokenizer, num_layers, resolve_layers
from spd_ray.core.spans import calibration_batches
from spd_ray.core.subspace import (
    CapabilitySubspace,
    SufficientStats,
    build_subspace,
    random_subspace,
)
from spd_ray.stages.deepspeed import DeepSpeedStrategy, deepspeed_config, resolve_precision


@dataclass
class SubspaceResult:
    """Stage 1's outcome: the capability subspace saved in `path`, with its figures."""
    path: Path
    subspace: CapabilitySubspace

    @classmethod
    def load(cls, path: Path) -> SubspaceResult:
        return cls(Path(path), CapabilitySubspace.load(path))

    def summary(self) -> str:
        sub = self.subspace
        return ", ".join(f"L{layer}.{kind} rank {b.shape[1]} energy {sub.energy[(layer, kind)]:.3f}"
                         for (layer, kind), b in sorted(sub.bases.items()))


def capability_subspace(model: ModelConfig, calibration: CalibrationConfig,
                        subspace: SubspaceConfig, examples: Sequence, loss: str,
                        out: Path) -> SubspaceResult:
    """Stage 1 (paper Eqs. 6-10): the calibration `examples` (`tasks.item.Item`s) tokenized with
    their correctness spans under `loss` (correctness, or full: the Table 5 ablation), their K/V
    gradient statistics summed over `calibration.num_workers` Ray workers, and the capability
    subspace computed once from the sum and saved in `out` (`subspace.kind=random`: random
    directions of the same ranks, the ablation; `activation`: the principal directions of the
    K/V activations on the same texts, no gradients, the control)."""
    batches, skipped = calibration_batches(
        load_tokenizer(model.path, model.trust_remote_code), [it.text for it in examples],
        [it.correctness_spans(loss) for it in examples], batch_size=calibration.batch_size,
        max_length=calibration.max_length, task=examples[0].domain if examples else "")
    layers = resolve_layers(num_layers(model.path, model.trust_remote_code), calibration.layers)
    stats, mean_loss, nodes = distributed_kv_stats(model, calibration, batches, layers,
                                                   kind="activation" if subspace.kind == "activation" else "gradient")
    result = build_subspace(stats, rank_mode=subspace.rank_mode, rank=subspace.rank,
                            energy=subspace.energy, center=subspace.center, meta={
                                "model": model.path, "layers": layers, "calibration_loss": loss,
                                "n_calibration": len(examples) - skipped, "skipped": skipped,
                                "calibration_hash": data.fingerprint([it.text for it in examples]),
                                "mean_calibration_loss": mean_loss, "worker_nodes": nodes})
    if subspace.kind == "random":  # the ablation: same ranks, random directions
        result = random_subspace(result, subspace.random_seed)
    result.save(out)
    return SubspaceResult(Path(out), result)


def _examples(batches: list[dict]) -> int:
    return sum(int(b["input_ids"].shape[0]) for b in batches)


@ray.remote
class CalibrationWorker:
    """One shard of stage 1: a full model replica, or (ZeRO-3) one rank's partition after
    `join_zero3`."""

    def __init__(self, model: ModelConfig, calibration: CalibrationConfig):
        self.model_cfg, self.calibration, self.ds = model, calibration, None
        if calibration.zero_stage == 0:
            self.model = load_model(model.path, model.dtype, model.device, model.trust_remote_code)

    def free_address(self) -> tuple[str, int]:
        """This node's IP and a port free on it: the process group's rendezvous."""
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def devices(self) -> tuple[str, list[str]]:
        """This worker's node and the ids of the GPUs Ray gave it."""
        context = ray.get_runtime_context()
        return context.get_node_id(), [str(i) for i in context.get_accelerator_ids().get("GPU", [])]

    def join_zero3(self, host: str, port: int, rank: int, world: int, ds_config: dict,
                   visible: str | None = None, local_rank: int = 0) -> dict:
        """Join the process group and load this rank's partition of the model (every rank at
        once); returns the rank, its node and its partition counts. `visible`, `local_rank`:
        the node's shared GPUs and this rank's among them (`shared_devices`)."""
        # the launcher's environment contract
        os.environ.update(MASTER_ADDR=host, MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
        if visible is not None:  # before CUDA starts in this process
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
            torch.cuda.set_device(local_rank)  # NCCL's communicator takes the current device
        self.ds = DeepSpeedStrategy(ds_config, gpu=self.calibration.gpus_per_worker > 0)
        self.ds.setup_distributed()
        m = self.model_cfg
        model = self.ds.load_model(m.path, m.trust_remote_code).eval()
        model.requires_grad_(False)  # activation gradients only: no parameter gradients
        self.model = self.ds.prepare(model).module
        return {"rank": rank, "node": ray.get_runtime_context().get_node_id(),
                **self.ds.partition_counts()}

    def accumulate(self, batches: list[dict], layers: list[int], padding: Sequence[dict] = (),
                   kind: str = "gradient") -> tuple[dict, float, int, str]:
        """(statistics as plain tensors, summed example losses, examples, node id) of one shard:
        of the K/V gradient rows, or (`kind` activation) of the K/V outputs, with no loss.
        `padding` (ZeRO-3 only): batches run after the shard, their statistics discarded."""
        if kind == "activation":  # forward passes only: a ZeRO-3 group runs them in step too
            stats: dict = {}
            for b in batches:
                accumulate_kv_activation_stats(self.model, [b], layers, stats)
            for b in padding:
                accumulate_kv_activation_stats(self.model, [b], layers)
            node = ray.get_runtime_context().get_node_id()
            return {key: s.to_dict() for key, s in stats.items()}, float("nan"), _examples(batches), node
        if self.ds is None:
            stats, mean_loss = accumulate_kv_gradient_stats(self.model, batches, layers)
            loss_sum = mean_loss * _examples(batches)
        else:
            # a call per batch is exactly one forward/backward pass, whatever the function's
            # internal re-batching: the pass counts of the ranks must match
            stats, loss_sum = {}, 0.0
            for b in batches:
                _, mean_loss = accumulate_kv_gradient_stats(self.model, [b], layers, stats=stats)
                loss_sum += mean_loss * _examples([b])
            for b in padding:
                accumulate_kv_gradient_stats(self.model, [b], layers)
        node = ray.get_runtime_context().get_node_id()
        return ({key: s.to_dict() for key, s in stats.items()}, loss_sum, _examples(batches), node)


def shared_devices(placements: list[tuple[str, list[str]]]) -> list[tuple[str | None, int]]:
    """Per rank, from its (node, GPU ids): CUDA_VISIBLE_DEVICES naming the GPUs of every rank on
    its node, and the index of its own among them (LOCAL_RANK), as Ray Train sets them so that
    NCCL can go peer-to-peer (NVLink) between a node's GPUs; (None, 0) for a rank without GPU."""
    by_node: dict[str, set[str]] = {}
    for node, ids in placements:
        by_node.setdefault(node, set()).update(ids)
    out: list[tuple[str | None, int]] = []
    for node, ids in placements:
        shared = sorted(by_node[node], key=int)
        out.append((",".join(shared), shared.index(ids[0])) if ids else (None, 0))
    return out


def _check_zero_stage(m: ModelConfig, c: CalibrationConfig) -> None:
    """Settings that cannot work, refused before any worker starts."""
    if c.zero_stage not in (0, 3):
        raise ValueError(f"calibration.zero_stage={c.zero_stage}; valid values: 0 (a model replica "
                         "per worker), 3 (one ZeRO-3-partitioned model over the workers)")
    if c.zero_stage != 3:
        return
    if c.gpus_per_worker not in (0, 1):
        raise ValueError(f"calibration.zero_stage=3 with calibration.gpus_per_worker="
                         f"{c.gpus_per_worker}: each rank uses exactly one device (NCCL refuses "
                         "two ranks on one GPU); set it to 1 for GPU workers or 0 for CPU workers")
    gpu = c.gpus_per_worker > 0
    if m.device != "auto" and (m.device == "cuda") != gpu:
        raise ValueError(f"calibration.zero_stage=3 with model.device={m.device} and "
                         f"calibration.gpus_per_worker={c.gpus_per_worker}: the ranks run on their "
                         "GPU when they have one, on CPU otherwise; set model.device=auto")


def _wait_for(group, n_workers: int, bundle: dict, timeout_s: float) -> None:
    """The placement group ready within `timeout_s`, or an error saying what it asks for and
    what the cluster has (a group that cannot be placed would wait forever)."""
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        have = {k: ray.cluster_resources().get(k, 0) for k in bundle}
        raise RuntimeError(
            f"stage 1 waited {timeout_s:g} s for {n_workers} calibration workers of {bundle} each "
            f"and the cluster has {have}: set calibration.num_workers=1 (or lower "
            "calibration.gpus_per_worker / cpus_per_worker), or raise "
            "calibration.placement_timeout_s while an autoscaler adds nodes") from None


def zero3_config(model: ModelConfig, calibration: CalibrationConfig, world: int,
                 overrides: dict | None = None) -> dict:
    """The DeepSpeed config of ZeRO-3 calibration: micro-batches of `calibration.batch_size`
    (inert, as are the other batch fields, without an optimizer) in the precision of
    `model.dtype` on the workers' devices (`resolve_precision`). Settings that cannot work are
    a ValueError (`_check_zero_stage`): the up-front check builds it dry."""
    _check_zero_stage(model, calibration)
    dtype = resolve_precision(model.dtype, gpu=calibration.gpus_per_worker > 0)
    return deepspeed_config(zero_stage=3, world_size=world,
                            micro_batch_size=calibration.batch_size, dtype=dtype,
                            overrides=overrides)


def distributed_kv_stats(model: ModelConfig, calibration: CalibrationConfig, batches: list[dict],
                         layers: list[int], *, kind: str = "gradient",
                         ds_overrides: dict | None = None, worker_info: list | None = None):
    """Summed statistics over `calibration.num_workers` Ray workers (of the gradient rows, or
    with `kind` activation of the K/V outputs), the mean loss, and the nodes the workers ran on. A worker (or its node) lost midway fails the whole attempt, which
    is made again on fresh workers up to `calibration.max_failures` times: the statistics are a
    function of the batches, and a ZeRO-3 group cannot go on without one of its ranks.

    ZeRO-3 only: `ds_overrides` is merged into the DeepSpeed config (e.g.
    `{"zero_optimization": {"stage3_param_persistence_threshold": 0}}` to partition a tiny
    model); `worker_info`, when given, receives one dict per rank (node, partition counts)."""
    tries = calibration.max_failures + 1
    for attempt in range(tries):
        try:
            return _kv_stats_once(model, calibration, batches, layers, ds_overrides, worker_info, kind)
        except (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError) as err:
            if attempt == tries - 1:
                raise
            console.warn(f"stage 1: a calibration worker was lost ({type(err).__name__}); "
                         f"attempt {attempt + 2} of {tries}")
            if worker_info is not None:
                worker_info.clear()


def _kv_stats_once(model: ModelConfig, c: CalibrationConfig, batches: list[dict], layers: list[int],
                   ds_overrides: dict | None, worker_info: list | None, kind: str):
    _check_zero_stage(model, c)
    if not batches:
        raise ValueError("no calibration batches: stage 1 needs at least one labeled example")
    zero3 = c.zero_stage == 3
    # a ZeRO-3 group keeps its size (it holds the model); replicas beyond the batches are idle
    n_workers = max(1, c.num_workers if zero3 else min(c.num_workers, len(batches)))
    # one bundle per worker; replicas on distinct nodes whenever enough nodes can hold one
    # (SPREAD alone is only a preference, and packs a small job onto one node)
    bundle = {k: v for k, v in {"CPU": c.cpus_per_worker, "GPU": c.gpus_per_worker}.items() if v > 0}
    fitting = [n for n in ray.nodes()
               if n["Alive"] and all(n["Resources"].get(k, 0) >= v for k, v in bundle.items())]
    strategy = "STRICT_SPREAD" if len(fitting) >= n_workers else "SPREAD"
    if zero3:  # its collectives run every layer: a node's GPUs (NVLink) before the network
        strategy = "PACK"
    group = placement_group([bundle] * n_workers, strategy=strategy)
    try:
        _wait_for(group, n_workers, bundle, c.placement_timeout_s)
        workers = [CalibrationWorker.options(
            num_cpus=c.cpus_per_worker, num_gpus=c.gpus_per_worker,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
        ).remote(model, c) for i in range(n_workers)]
        shards = [batches[i::n_workers] for i in range(n_workers)]
        padding = [[] for _ in shards]
        if zero3:
            host, port = ray.get(workers[0].free_address.remote())
            ds_config = zero3_config(model, c, n_workers, ds_overrides)
            devices = shared_devices(ray.get([w.devices.remote() for w in workers]))
            info = ray.get([w.join_zero3.remote(host, port, rank, n_workers, ds_config, *devices[rank])
                            for rank, w in enumerate(workers)])
            if worker_info is not None:
                worker_info.extend(info)
            # shard 0 is the longest; any batch serves as padding (its statistics are dropped)
            padding = [[batches[0]] * (len(shards[0]) - len(s)) for s in shards]
        results = ray.get([w.accumulate.remote(s, layers, p, kind)
                           for w, s, p in zip(workers, shards, padding)])
        for w in workers:
            ray.kill(w)
    finally:
        remove_placement_group(group)  # also ends the workers if anything failed
    total: dict = {}
    for stats, *_ in results:
        for key, d in stats.items():
            s = SufficientStats.from_dict(d)
            total[key] = total[key] + s if key in total else s
    loss_sum, n = sum(r[1] for r in results), sum(r[2] for r in results)
    return total, loss_sum / max(1, n), sorted({r[3] for r in results})
