"""Ray for the length of a job: `ray_session` joins the cluster the job was submitted to, or
starts a local Ray (`start_local_ray`) that ends with its driver, even a killed one.

Ray's head processes (GCS, raylet) share the fate of the driver that started them, but its
dashboard and runtime-env agents do not: when the raylet dies unexpectedly they report the death
to the GCS, which died too, and wait out that call's 60 s timeout
(`ray._private.utils.publish_error_to_driver`), holding their memory and ports meanwhile. A
watcher process, started beside the local Ray, ends them as soon as the driver is gone.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import ray

from spd_ray import OFFLINE_DEFAULTS
from spd_ray.config import RunConfig

# the watcher, run by path (-I: neither this folder nor the working directory on its sys.path)
_WATCHER = Path(__file__).resolve().with_name("local_ray_watcher.py")


_DRIVER_ENDS: list[int] = []


def _children(pid: int, name: bytes) -> list[int]:
    """Child processes of `pid` whose executable path holds `name`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid \
                    and name in (entry / "cmdline").read_bytes().split(b"\0")[0]:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            pass
    return found


def start_local_ray(**init_kwargs):
    """`ray.init(**init_kwargs)` for a new local cluster, plus the watcher (Linux; elsewhere the
    agents end on their own a minute after a killed driver); returns Ray's context.
    address="local": a plain init would join the Ray whose address another one left in /tmp/ray
    (`ray start --head`, `ray.cluster_utils.Cluster`)."""
    context = ray.init(address="local", **init_kwargs)
    raylets = _children(os.getpid(), b"raylet") if Path("/proc/self/stat").exists() else []
    if raylets:
        read, write = os.pipe()  # neither end is inherited by anything else (PEP 446)
        subprocess.Popen([sys.executable, "-S", "-I", str(_WATCHER), *map(str, raylets)],
                         stdin=read,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(read)
        _DRIVER_ENDS.append(write)  # held open, never written, for the driver's lifetime
    return context


@contextlib.contextmanager
def ray_session(run: RunConfig) -> Iterator[str]:
    """Ray for the length of a job; yields where Ray keeps this session's logs on this node (every
    worker's output among them), with its dashboard's address when it has one. Joins the cluster
    this job was submitted to (or `run.ray_address`), else starts a new local Ray (never another
    one running on this machine), which ends with the
    block, before the job's console session does, so no late output of the workers reaches the
    console. A Ray the caller connected is left to the caller.

    The local Ray has its dashboard (on 127.0.0.1), whose HTTP server is also Ray's State API:
    Ray Train polls it every second of stage 3 to tell whether its controller is alive (its
    PlacementGroupCleaner; without the API it warns each time that it cannot). The workers are
    told its address (RAY_API_SERVER_ADDRESS): they would look it up among the Ray instances
    running on this machine, and give up where there are several. Ray Data's own progress bars
    are off unless run.verbose: the console has one bar per long stage."""
    if not run.verbose:
        ray.data.DataContext.get_current().enable_progress_bars = False
    ours = not ray.is_initialized()
    env = {"env_vars": {name: os.environ[name] for name in OFFLINE_DEFAULTS}}
    address = run.ray_address or os.environ.get("RAY_ADDRESS")
    if not ours:
        context = ray.init(ignore_reinit_error=True)  # the caller's Ray: only its context
    elif address:
        context = ray.init(address=address, runtime_env=env)
    else:
        with socket.socket() as sock:  # a free port (the default, 8265, may be another Ray's)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env["env_vars"]["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        # more logical CPUs than cores, so the stages' actors and tasks never starve each other
        context = start_local_ray(num_cpus=max(4, os.cpu_count() or 1),
                                  dashboard_port=port, runtime_env=env)
    logs = Path(context.address_info["session_dir"]) / "logs"
    try:
        yield f"{logs} (dashboard http://{context.dashboard_url})" if context.dashboard_url else str(logs)
    finally:
        if ours:
            ray.shutdown()
