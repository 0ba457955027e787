"""Stage 1 with calibration.zero_stage=3: Ray workers share one ZeRO-3-partitioned model."""

import pytest

from spd_ray.config import SPDConfig
from spd_ray.core.gradients import accumulate_kv_gradient_stats
from spd_ray.core.modeling import resolve_layers
from spd_ray.core.spans import calibration_batches
from spd_ray.core.subspace import build_subspace
from spd_ray.stages.calibrate import distributed_kv_stats, shared_devices
from spd_ray.tasks.testbed import make_split
from tests.tolerances import assert_stats_close, assert_subspaces_close


def _cfg(path: str, **calibration) -> SPDConfig:
    cfg = SPDConfig()
    cfg.model.path, cfg.model.device = path, "cpu"
    for k, v in {"zero_stage": 3, "num_workers": 2, **calibration}.items():
        setattr(cfg.calibration, k, v)
    return cfg


def test_ranks_on_one_node_see_each_others_gpus():
    """As Ray Train does (NCCL peer-to-peer within a node): each rank sees its node's GPUs of the
    group, and its LOCAL_RANK points at its own; ranks without a GPU keep Ray's environment."""
    placements = [("a", ["3"]), ("b", ["0"]), ("a", ["1"]), ("a", ["10"]), ("b", ["2"])]
    assert shared_devices(placements) == [("1,3,10", 1), ("0,2", 0), ("1,3,10", 0), ("1,3,10", 2),
                                          ("0,2", 1)]
    assert shared_devices([("a", []), ("a", [])]) == [(None, 0), (None, 0)]


@pytest.mark.parametrize("setting, match", [
    ({"gpus_per_worker": 0.5}, "exactly one device"),
    ({"gpus_per_worker": 1}, "model.device=auto"),  # model.device=cpu contradicts the GPUs
    ({"zero_stage": 2}, "valid values: 0"),
])
def test_settings_that_cannot_work_fail_before_any_worker(testbed_model_path, setting, match):
    with pytest.raises(ValueError, match=match):
        cfg = _cfg(testbed_model_path, **setting)
        distributed_kv_stats(cfg.model, cfg.calibration, [{}], [0])


@pytest.mark.slow
def test_zero3_two_workers_uneven_shards_equal_one_process(local_ray, testbed_model_path,
                                                           testbed_tokenizer, testbed_model):
    items = make_split("math", "calibration", 10)
    batches, _ = calibration_batches(testbed_tokenizer, [it.text for it in items],
                                     [it.correctness_spans() for it in items], batch_size=4, max_length=256)
    assert len(batches) == 3  # rank 0 runs 2 batches, rank 1 one and a discarded padding pass
    layers = resolve_layers(testbed_model, None)
    local, local_loss = accumulate_kv_gradient_stats(testbed_model, batches, layers)

    info: list = []
    cfg = _cfg(testbed_model_path)
    summed, loss, nodes = distributed_kv_stats(
        cfg.model, cfg.calibration, batches, layers, worker_info=info,
        ds_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})

    # really partitioned: every parameter is split, each rank holds about half of the weights
    assert [i["rank"] for i in info] == [0, 1] and len(nodes) == 1
    for i in info:
        assert i["zero3_partitioned"] == i["zero3_params"] == i["params"] > 0
        assert i["local_numel"] <= i["full_numel"] // 2 + i["params"]
    assert sum(i["local_numel"] for i in info) >= info[0]["full_numel"]

    assert loss == pytest.approx(local_loss, rel=1e-5)
    assert_stats_close(summed, local)  # float32 gradients: equal to rounding
    assert_subspaces_close(build_subspace(summed), build_subspace(local))
