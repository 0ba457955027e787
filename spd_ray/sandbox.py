"""Running model-written Python for evaluation: one throwaway process per program.

Containment, outermost first: a fresh interpreter without site-packages in a new session, an
empty temporary working directory, an environment built from scratch, resource limits (CPU time,
address space, file size, no core dumps, few processes), a wall-clock timeout that kills the whole
process group, capped output, and a short prelude that disables process creation, sockets, signals
and file deletion, keeps writes inside the working directory, and keeps reads and directory
listings inside the working directory and the standard library (through open, io.open, pathlib,
os.open, os.listdir and os.scandir; os.stat and friends still tell whether a path exists).

The prelude is defence in depth, not a security boundary: a determined program can undo it
(ctypes, _io, posix, _socket, _posixsubprocess) and then read any file and reach any host the
worker's user can. Do not run untrusted code on machines that hold secrets without an OS-level
sandbox (container, VM, seccomp, no network) around the worker.

`run_many` runs batches as Ray tasks when Ray is initialized, threads otherwise.
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

import ray

_SYNTAX_ERROR_EXIT = 86  # the prelude's exit status when the program does not compile
_FILE_LIMIT = 1 << 20  # largest file the program may write, its own stderr included
# Not -I: it implies -E, which would drop the fixed hash seed that keeps set order (and so
# scores) reproducible. The environment is ours anyway, so -E would add nothing.
_ENV = {"PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8"}

# Runs in the child before the program. Limits are set here rather than in preexec_fn, which is
# unsafe (can deadlock) when run_many's threads start processes.
_PRELUDE = """\
import builtins, io, os, resource, shutil, signal, socket, subprocess, sys, types
def _blocked(*args, **kwargs):
    raise PermissionError("blocked by the spd-ray sandbox")
for _name, _value in (("RLIMIT_CPU", {cpu}), ("RLIMIT_AS", {memory}), ("RLIMIT_FSIZE", {fsize}),
                      ("RLIMIT_CORE", 0), ("RLIMIT_NPROC", 64)):  # NPROC is not enforced for root
    resource.setrlimit(getattr(resource, _name), (_value, _value))
resource.setrlimit = resource.prlimit = _blocked  # root could raise the hard limits again
for _name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execvp", "execvpe",
              "spawnv", "spawnve", "posix_spawn", "posix_spawnp", "kill", "killpg", "remove",
              "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "chmod", "chown",
              "truncate", "setsid", "setpgid"):
    if hasattr(os, _name):
        setattr(os, _name, _blocked)
shutil.rmtree = shutil.move = signal.pthread_kill = _blocked
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = _blocked
socket.socket = socket.create_connection = socket.socketpair = socket.fromfd = _blocked
_open, _os_open, _listdir, _scandir = io.open, os.open, os.listdir, os.scandir
_work = os.path.join(os.getcwd(), "")
_readable = tuple(os.path.join(os.path.realpath(p), "") for p in sys.path)  # "": the working dir
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def _check(path, write):  # writes stay in the working directory, reads also see the stdlib
    if isinstance(path, int):  # an already open file descriptor
        return
    real = os.path.join(os.fsdecode(os.path.realpath(path)), "")
    if not real.startswith(_work if write else _readable):
        raise PermissionError(f"{{path!r}} is outside the sandbox")
def _open_checked(file, mode="r", *args, **kwargs):
    _check(file, bool(set(mode) & set("wax+")))
    return _open(file, mode, *args, **kwargs)
def _os_open_checked(path, flags, mode=0o777):  # no dir_fd: it would dodge the path check
    _check(path, bool(flags & _WRITE_FLAGS))
    return _os_open(path, flags, mode)
def _listdir_checked(path="."):
    _check(path, False)
    return _listdir(path)
def _scandir_checked(path="."):
    _check(path, False)
    return _scandir(path)
builtins.open = io.open = _open_checked
os.open, os.listdir, os.scandir = _os_open_checked, _listdir_checked, _scandir_checked
builtins.exit = builtins.quit = sys.exit  # -S leaves them undefined
_path = sys.argv.pop()
try:
    with _open(_path, encoding="utf-8") as _file:
        _code = compile(_file.read(), "program.py", "exec")
except (SyntaxError, ValueError) as _err:  # ValueError: null bytes (Python < 3.12)
    print(f"{{type(_err).__name__}}: {{_err}}", file=sys.stderr)
    sys.exit({syntax_exit})
# Like the HumanEval/MBPP harnesses, __name__ is not "__main__": a completion's demo block
# (which often reads stdin) does not run. A registered module keeps pickle/dataclasses working.
_module = sys.modules["__sandbox__"] = types.ModuleType("__sandbox__")
exec(_code, _module.__dict__)
"""


@dataclass
class ExecResult:
    passed: bool
    status: str  # passed | failed | timeout | error
    stderr_tail: str = ""


def run_program(
    code: str, timeout_s: float = 5.0, memory_mb: int = 512, max_output_bytes: int = 10_000
) -> ExecResult:
    """Run `code`; it passes when it exits with status 0 within the limits.

    status: "error" when it does not compile, "timeout" when it runs past `timeout_s` (wall clock
    or CPU time), "failed" for any other non-zero exit (assertion, exception, memory limit)."""
    prelude = _PRELUDE.format(
        cpu=max(1, math.ceil(timeout_s)),
        memory=memory_mb << 20,
        fsize=max(_FILE_LIMIT, max_output_bytes),
        syntax_exit=_SYNTAX_ERROR_EXIT,
    )
    with tempfile.TemporaryDirectory(prefix="spd-sandbox-") as tmp:
        # the program and its stderr sit beside (not in) the program's working directory
        workdir, program = os.path.join(tmp, "work"), os.path.join(tmp, "program.py")
        os.mkdir(workdir)
        with open(program, "w", encoding="utf-8", errors="replace") as f:
            f.write(code)
        # stderr goes to a file so RLIMIT_FSIZE caps it (a pipe would buffer without bound)
        with open(os.path.join(tmp, "stderr"), "w+b") as err_file:
            proc = subprocess.Popen(  # -B: no .pyc written into the shared stdlib
                [sys.executable, "-B", "-s", "-S", "-c", prelude, program],
                cwd=workdir,
                env=_ENV,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err_file,
                start_new_session=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:  # the program and anything it left behind in its process group
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
            err_file.seek(0)
            tail = err_file.read()[-max_output_bytes:].decode(errors="replace")
    rc = proc.returncode
    if rc == 0 and not timed_out:
        return ExecResult(True, "passed", tail)
    # RLIMIT_CPU sends SIGXCPU, then SIGKILL at the hard limit (equal here)
    if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL):
        return ExecResult(False, "timeout", tail)
    return ExecResult(False, "error" if rc == _SYNTAX_ERROR_EXIT else "failed", tail)


def run_tests(
    completion: str, tests: Sequence[str], setup: str = "", timeout_s: float = 5.0
) -> ExecResult:
    """Run `setup`, then the completion, then the test lines (MBPP `assert`s)."""
    return run_program("\n".join([setup, completion, *tests]) + "\n", timeout_s)


def _run_local(
    jobs: Sequence[tuple[str, Sequence[str]]], timeout_s: float, workers: int
) -> list[ExecResult]:
    with ThreadPoolExecutor(workers) as pool:  # each thread only waits on its subprocess
        return list(pool.map(lambda job: run_tests(job[0], job[1], timeout_s=timeout_s), jobs))


_CHUNK = 16  # programs per Ray task: a few hundred tiny programs make a few dozen tasks
# A task reserves one CPU and keeps two programs going: most of a short program's time is
# interpreter start-up, and a sleeping or timed-out one should not idle the CPU.
_TASK_THREADS = 2
_run_chunk = ray.remote(num_cpus=1)(_run_local)


def run_many(
    jobs: Sequence[tuple[str, Sequence[str]]],
    timeout_s: float = 5.0,
    max_workers: int | None = None,
) -> list[ExecResult]:
    """(completion, tests) pairs run in parallel; results keep the input order.

    With Ray initialized, chunks of `_CHUNK` programs run as Ray tasks (`max_workers` programs at
    a time per task, default `_TASK_THREADS`); otherwise threads here (default: one per CPU)."""
    if not ray.is_initialized():
        return _run_local(jobs, timeout_s, max_workers or os.cpu_count() or 1)
    chunks = [jobs[i : i + _CHUNK] for i in range(0, len(jobs), _CHUNK)]
    refs = [_run_chunk.remote(c, timeout_s, max_workers or _TASK_THREADS) for c in chunks]
    return [result for chunk in ray.get(refs) for result in chunk]
