"""Running model-written Python for evaluation: one throwaway process per program.

Containment, outermost first: a fresh isolated interpreter (`-I -S`) in a new session and an
empty temporary directory, an empty environment, resource limits (CPU time, address space,
file size, no core dumps, few processes), a wall-clock timeout that kills the whole process
group, capped output, and a short prelude that disables process creation, sockets and file
deletion inside the program. The prelude is defence in depth, not a security boundary (a
determined program can undo it); do not run untrusted code on machines that hold secrets
without an OS-level sandbox around the worker.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# Limits are set by the child itself (no preexec_fn: it is unsafe with the thread pool below).
_PRELUDE = """\
import os, resource, shutil, socket, subprocess
for _limit, _value in (("RLIMIT_CPU", {cpu}), ("RLIMIT_AS", {memory}), ("RLIMIT_FSIZE", {fsize}),
                       ("RLIMIT_CORE", 0), ("RLIMIT_NPROC", 64)):  # NPROC is not enforced for root
    resource.setrlimit(getattr(resource, _limit), (_value, _value))
def _blocked(*args, **kwargs):
    raise PermissionError("blocked by the spd-ray sandbox")
for _name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execvp", "execvpe", "spawnv",
              "spawnve", "kill", "killpg", "remove", "unlink", "rmdir", "removedirs", "rename",
              "replace", "chmod", "chown", "truncate", "posix_spawn", "posix_spawnp"):
    if hasattr(os, _name):
        setattr(os, _name, _blocked)
shutil.rmtree = shutil.move = _blocked
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = _blocked
socket.socket = socket.create_connection = _blocked
del _name, _limit, _value
"""


@dataclass
class ExecResult:
    passed: bool
    status: str  # passed | failed | timeout | error
    stderr_tail: str = ""


def run_program(code: str, timeout_s: float = 5.0, memory_mb: int = 512,
                max_output_bytes: int = 10_000) -> ExecResult:
    """Run `code`; it passes when it exits with status 0 within the limits."""
    try:
        compile(code, "<program>", "exec")
    except (SyntaxError, ValueError) as err:
        return ExecResult(False, "error", f"{type(err).__name__}: {err}")
    prelude = _PRELUDE.format(cpu=math.ceil(timeout_s), memory=memory_mb << 20, fsize=max_output_bytes)
    with tempfile.TemporaryDirectory(prefix="spd-sandbox-") as workdir:
        # stderr goes to a file so RLIMIT_FSIZE caps it (a pipe would buffer without bound)
        with open(os.path.join(workdir, ".stderr"), "w+b") as err_file:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", prelude + "\n" + code],
                cwd=workdir, env={"PYTHONHASHSEED": "0"}, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err_file, start_new_session=True,
            )
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
            finally:
                try:  # the program and anything it left behind in its session
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            timed_out = proc.wait() == -signal.SIGKILL
            err_file.seek(0)
            err = err_file.read()[-max_output_bytes:]
    if timed_out:
        return ExecResult(False, "timeout")
    tail = err.decode(errors="replace")
    if proc.returncode == 0:
        return ExecResult(True, "passed", tail)
    # killed by the CPU limit counts as a timeout
    status = "timeout" if proc.returncode == -signal.SIGXCPU else "failed"
    return ExecResult(False, status, tail)


def run_tests(completion: str, tests: Sequence[str], setup: str = "", timeout_s: float = 5.0) -> ExecResult:
    return run_program(setup + completion + "\n" + "\n".join(tests) + "\n", timeout_s)


def run_many(jobs: Sequence[tuple[str, Sequence[str]]], timeout_s: float = 5.0,
             max_workers: int | None = None) -> list[ExecResult]:
    """(completion, tests) pairs run in parallel; results keep the input order."""
    workers = max_workers or os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:  # each thread only waits on its subprocess
        return list(pool.map(lambda job: run_tests(job[0], job[1], timeout_s=timeout_s), jobs))
