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

# Runs in its own interpreter (no fork of a process with Ray's threads). Until EOF on stdin,
# which comes when the driver, the only holder of the pipe's other end, exits or is killed, it
# notes every descendant of the driver's raylets once a second (the agents are the raylet's
# children); then it kills those still running, each checked by its start time, so that a pid
# reused by another process is left alone.
_WATCHER = r"""
import os, select, signal, sys
from pathlib import Path

def table():
    procs = {}
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            procs[int(entry.name)] = (int(fields[1]), fields[19])  # parent, start time
        except (OSError, ValueError, IndexError):
            pass
    return procs

roots, noted = {int(pid) for pid in sys.argv[1:]}, {}
while not select.select([sys.stdin], [], [], 1.0)[0] or sys.stdin.buffer.read1(1):
    procs = table()
    for pid, (parent, start) in procs.items():
        line, seen = parent, set()
        while line in procs and line not in roots and line not in seen:
            seen.add(line)
            line = procs[line][0]
        if line in roots:
            noted[pid] = start
procs = table()
for pid, start in noted.items():
    if pid in procs and procs[pid][1] == start:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
"""


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
    agents end on their own a minute after a killed driver). address="local": a plain init
    would join the Ray whose address another one left in /tmp/ray (`ray start --head`)."""
    ray.init(address="local", **init_kwargs)
    raylets = _children(os.getpid(), b"raylet") if Path("/proc/self/stat").exists() else []
    if raylets:
        read, write = os.pipe()  # neither end is inherited by anything else (PEP 446)
        subprocess.Popen([sys.executable, "-S", "-c", _WATCHER, *map(str, raylets)], stdin=read,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(read)
        _DRIVER_ENDS.append(write)  # held open, never written, for the driver's lifetime
