"""A local Ray for a job run on one machine, which ends with its driver, even a killed one.

Ray's head processes (GCS, raylet) share the fate of the driver that started them, but its
dashboard and runtime-env agents do not: when the raylet dies unexpectedly they report the death
to the GCS, which died too, and wait out that call's 60 s timeout
(`ray._private.utils.publish_error_to_driver`), holding their memory and ports meanwhile. A
watcher process, started beside the local Ray, ends them as soon as the driver is gone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ray

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


def start_local_ray(**init_kwargs) -> None:
    """`ray.init(**init_kwargs)` for a new local cluster, plus the watcher (Linux; elsewhere the
    agents end on their own a minute after a killed driver)."""
    ray.init(**init_kwargs)
    raylets = _children(os.getpid(), b"raylet") if Path("/proc/self/stat").exists() else []
    if raylets:
        read, write = os.pipe()  # neither end is inherited by anything else (PEP 446)
        subprocess.Popen([sys.executable, "-S", "-I", str(_WATCHER), *map(str, raylets)],
                         stdin=read,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(read)
        _DRIVER_ENDS.append(write)  # held open, never written, for the driver's lifetime
