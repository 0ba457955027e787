"""A local Ray started for a job ends with its driver, a killed one too (spd_ray/local_ray.py)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DRIVER = """
import sys, time
from spd_ray.local_ray import start_local_ray
start_local_ray(num_cpus=1, include_dashboard=False)
print("up", flush=True)
time.sleep(600)
"""


def _running(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(pid)
        except OSError:
            pass
    return alive


@pytest.mark.faults
def test_the_agents_of_a_killed_drivers_local_ray_end_within_seconds():
    from spd_ray.local_ray import _children

    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert driver.stdout.readline().strip() == "up"
        raylet, agents = _children(driver.pid, b"raylet"), []
        deadline = time.monotonic() + 30
        while len(agents) < 2 and time.monotonic() < deadline:  # the dashboard and runtime-env agents
            agents = [pid for pid in _children(raylet[0], b"ray::") if b"Agent" in _cmdline(pid)]
            time.sleep(0.2)
        assert len(agents) == 2, agents
        time.sleep(1.5)  # the watcher notes the raylet's children once a second
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        killed = time.monotonic()
        while _running(agents) and time.monotonic() < killed + 20:
            time.sleep(0.2)
        assert _running(agents) == [], "the agents outlived the driver by 20 s (Ray alone: about 60 s)"
    finally:
        driver.kill()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
