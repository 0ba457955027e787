"""Stage 1 on Ray: the calibration batches are sharded over workers, each holding a model
replica; each worker returns the sufficient statistics of its shard, the driver sums them and
computes the capability subspace once (the sum is exact: SPD_METHOD.md step 4)."""

from __future__ import annotations

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from spd_ray.config import SPDConfig
from spd_ray.gradients import accumulate_kv_gradient_stats
from spd_ray.modeling import load_model
from spd_ray.subspace import SufficientStats


@ray.remote
class CalibrationWorker:
    def __init__(self, cfg: SPDConfig):
        m = cfg.model
        self.model = load_model(m.path, m.dtype, m.device, m.trust_remote_code)

    def accumulate(self, batches: list[dict], layers: list[int]) -> tuple[dict, float, int, str]:
        """(statistics as plain tensors, summed example losses, examples, node id) of one shard."""
        stats, mean_loss = accumulate_kv_gradient_stats(self.model, batches, layers)
        n = sum(int(b["input_ids"].shape[0]) for b in batches)
        node = ray.get_runtime_context().get_node_id()
        return {key: s.to_dict() for key, s in stats.items()}, mean_loss * n, n, node


def distributed_kv_stats(cfg: SPDConfig, batches: list[dict], layers: list[int]):
    """Summed statistics over `calibration.num_workers` Ray workers, the mean loss, and the
    nodes the workers ran on."""
    c = cfg.calibration
    n_workers = max(1, min(c.num_workers, len(batches)))
    # one bundle per worker, on distinct nodes whenever enough nodes can hold one (SPREAD alone
    # is only a preference, and packs a small job onto one node)
    bundle = {k: v for k, v in {"CPU": c.cpus_per_worker, "GPU": c.gpus_per_worker}.items() if v > 0}
    fitting = [n for n in ray.nodes()
               if n["Alive"] and all(n["Resources"].get(k, 0) >= v for k, v in bundle.items())]
    strategy = "STRICT_SPREAD" if len(fitting) >= n_workers else "SPREAD"
    group = placement_group([bundle] * n_workers, strategy=strategy)
    ray.get(group.ready())
    try:
        workers = [CalibrationWorker.options(
            num_cpus=c.cpus_per_worker, num_gpus=c.gpus_per_worker,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
        ).remote(cfg) for i in range(n_workers)]
        shards = [batches[i::n_workers] for i in range(n_workers)]
        results = ray.get([w.accumulate.remote(shard, layers) for w, shard in zip(workers, shards)])
        for w in workers:
            ray.kill(w)
    finally:
        remove_placement_group(group)
    total: dict = {}
    for stats, *_ in results:
        for key, d in stats.items():
            s = SufficientStats.from_dict(d)
            total[key] = total[key] + s if key in total else s
    loss_sum, n = sum(r[1] for r in results), sum(r[2] for r in results)
    return total, loss_sum / max(1, n), sorted({r[3] for r in results})
