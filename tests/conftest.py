"""Shared fixtures: tiny models built in memory, the shipped testbed model, offline hubs."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Ray Train's controller polls its workers every 2 s (the default), a wait every stage-3 run pays
# at its start and end; the suite makes a dozen such runs on tiny data, so its controllers poll
# faster. Drivers started by the tests inherit it, and Ray Train passes it to its controller.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

import pytest  # noqa: E402
import torch  # noqa: E402

from spd_ray.config import TESTBED_MODEL  # noqa: E402

# The Ray the tests share: a new local cluster (start_local_ray: never another Ray on this
# machine, as a plain ray.init() would join one whose address file a `ray start --head` or a
# ray.cluster_utils test left). Workers get one thread each (2 cores here).
LOCAL_RAY = {"num_cpus": 4, "include_dashboard": False,
             "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                          "TOKENIZERS_PARALLELISM": "false"}}}


def _group(item) -> int:
    """Unit tests first, then the tests on the shared Ray (one block, one Ray), then the other
    slow ones (whole jobs, each with a Ray of its own), the fault injections last."""
    if "local_ray" in item.fixturenames:
        return 1
    return 3 if item.get_closest_marker("faults") else 2 if item.get_closest_marker("slow") else 0


@pytest.hookimpl(tryfirst=True)  # before -m deselects: it reads the ray marks added here
def pytest_collection_modifyitems(config, items):
    items.sort(key=_group)  # stable: within a group the files' order
    for item in items:
        if "local_ray" in item.fixturenames:
            item.add_marker(pytest.mark.ray)
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
        for item in items:
            if item.get_closest_marker("gpu"):  # keywords also hold folder names
                item.add_marker(skip)
    from spd_ray.tasks.sandbox import isolation

    # CI must isolate: there a missing bubblewrap fails these tests instead of skipping them
    if not os.environ.get("CI") and not (facts := isolation())["available"]:
        skip = pytest.mark.skip(reason=f"the isolated sandbox is unavailable: {facts['missing']}")
        for item in items:
            if "isolated" in item.keywords:
                item.add_marker(skip)


# the real model and its tasks, written by `make real-model` (which `make test` runs first)
ROOT = Path(__file__).resolve().parents[1]
REAL_MODEL = ROOT / "models" / "smollm2-135m-instruct"
REAL_GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_DATA = ROOT / "data" / "real"
WHEELS = ROOT / ".cache" / "wheels"


def _made_by_make_real_model(path: Path) -> Path:
    """`path`, or a visible skip where `make real-model` has not run (a failure in CI, whose
    `make test` runs it)."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: make test runs make real-model first")
        pytest.skip(f"{path} is missing: run make real-model")
    return path


@pytest.fixture(scope="session")
def real_model() -> Path:
    return _made_by_make_real_model(REAL_MODEL)


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    return _made_by_make_real_model(REAL_GGUF)


@pytest.fixture(scope="session")
def real_data() -> Path:
    return _made_by_make_real_model(REAL_DATA / "MANIFEST.json").parent


@pytest.fixture(scope="session")
def wheels() -> Path:
    return _made_by_make_real_model(WHEELS)


@pytest.fixture(scope="session")
def testbed_model_path() -> str:
    if not (TESTBED_MODEL / "config.json").exists():
        pytest.fail(f"the shipped testbed model is missing at {TESTBED_MODEL}; "
                    "make it with python jobs/make_testbed_model.py")
    return str(TESTBED_MODEL)


@pytest.fixture(scope="session")
def testbed_tokenizer(testbed_model_path):
    from spd_ray.core.modeling import load_tokenizer

    return load_tokenizer(testbed_model_path)


@pytest.fixture(scope="session")
def testbed_model(testbed_model_path):
    from spd_ray.core.modeling import load_model

    return load_model(testbed_model_path, device="cpu")


@pytest.fixture(scope="module")
def local_ray():
    """The shared local Ray (`LOCAL_RAY`), started by the first module that asks for it, and
    again after a test that ended it."""
    import ray

    from spd_ray.local_ray import start_local_ray

    if not ray.is_initialized():
        start_local_ray(**LOCAL_RAY)
    ray.data.DataContext.get_current().enable_progress_bars = False


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    # no other test runs with Ray up: run_many would use it, a job would take it for its own
    if "local_ray" in item.fixturenames and (nextitem is None
                                             or "local_ray" not in nextitem.fixturenames):
        import ray

        ray.shutdown()
