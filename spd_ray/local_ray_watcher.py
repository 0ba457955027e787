"""The local Ray's watcher (spd_ray.local_ray starts it by path, in its own interpreter: no fork
of a process with Ray's threads), as `python -S -I local_ray_watcher.py RAYLET_PID...`.

Until EOF on stdin, which comes when the driver, the only holder of the pipe's other end, exits
or is killed, it notes every descendant of the driver's raylets once a second (the agents are
the raylet's children); then it kills those still running, each checked by its start time, so
that a pid reused by another process is left alone.
"""

import os
import select
import signal
import sys
from pathlib import Path


def table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process."""
    procs = {}
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            procs[int(entry.name)] = (int(fields[1]), fields[19])  # parent, start time
        except (OSError, ValueError, IndexError):
            pass
    return procs


def main(roots: set[int]) -> None:
    noted = {}
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


if __name__ == "__main__":
    main({int(pid) for pid in sys.argv[1:]})
