"""Shared fixtures: tiny models built in memory, the shipped testbed model, offline hubs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from spd_ray.config import TESTBED_MODEL  # noqa: E402


def pytest_collection_modifyitems(config, items):
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
