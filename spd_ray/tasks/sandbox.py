"""Running model-written Python for scoring, in sandboxes that the kernel isolates.

A pass means the tests ran to the end. In the sandbox a small trusted harness runs the setup,
the program and then each test, and only after the last test writes a result line that starts
with a per-program secret the program never sees. An early exit (exit(), sys.exit, SystemExit,
os._exit, an atexit hook), a signal, a timeout, or a missing or unsigned result line is a
failure, with its reason.

The interpreter starts once per sandbox: a zygote in it forks one child per program, which
drops its privileges, sets its limits and runs the program, one program at a time. After each,
the zygote kills every process the program left and removes its files, so one sandbox serves
program after program: nothing of one is left when the next starts. As root each program runs
as a fresh uid; otherwise the programs share the caller's uid in the sandbox's user namespace
with the zygote, which makes itself undumpable so that none can ptrace it.

Mode "isolated" (the default) is the kernel's isolation, through bubblewrap (`bwrap`):
- its own PID namespace: it sees only the sandbox's processes and can signal only its own, and
  everything it started is killed when it ends or its time runs out;
- its own network namespace with nothing but a loopback of its own: no host loopback
  services, no cloud metadata endpoint, no network at all; its own IPC and UTS namespaces;
- its own mount namespace: read-only /usr, the interpreter's standard library (its
  site-packages hidden) and the zygote's own file (/zygote.py), a minimal /dev, and a private
  16 MiB tmpfs at /tmp as its working directory; nothing else of the host's filesystem, and no
  /proc at all;
- an unprivileged uid with no capabilities and no_new_privs: a fresh uid that owns nothing
  when the caller is root, else the caller's uid mapped into a user namespace that may not
  create further user namespaces;
- an environment holding only PYTHONHASHSEED=0 (so set order, and so scores, are reproducible),
  and the PWD and LC_CTYPE that bwrap and Python set;
- rlimits set before the program runs (CPU time, address space, file size, open files,
  processes, no core dumps), a wall-clock timeout, and output capped by the file-size limit.
Mode "process" runs the same zygote as a plain child process, one program each, with the same
rlimits, timeout, empty environment and throwaway working directory, and nothing else: the
program runs as the caller, sees the caller's files and network, and a child that leaves the
process group can outlive it. It exists for machines that cannot isolate; choosing it is logged as a warning.

Not guaranteed, in either mode: a program that deliberately inspects the harness's own memory
(its frames or file descriptors) can forge its own pass, since it runs in the same interpreter
as its tests; so can one that returns objects that compare equal to anything. Isolation keeps
such a program from harming anything outside, but only execution that is not in-process could
make its score trustworthy. There is no cgroup: total memory is bounded only by processes x
address-space limit, and no seccomp filter narrows the system calls the kernel offers. In a reused
sandbox, System V IPC objects a program creates (through ctypes; the standard library has no
API for them) outlive it and could be read by a later program of the same sandbox.

`run_many` runs programs in parallel: as Ray tasks when Ray is initialized, threads otherwise.
`python -m spd_ray.tasks.sandbox` prints what isolation this machine gives.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import marshal
import os
import queue
import secrets
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import typing
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ray

from spd_ray import console
from spd_ray.config import EvalConfig, SandboxMode
from spd_ray.tasks.sandbox_zygote import Answer, Job

MODES = typing.get_args(SandboxMode)
log = logging.getLogger(__name__)

MEMORY_MB = 512  # address space per program
MAX_OUTPUT_BYTES = 10_000  # the tail of a program's stderr that comes back with its result
_MAX_PROCESSES = 16  # the harness included: a fork bomb stops here
_MAX_OPEN_FILES = 64
_FILE_LIMIT = 1 << 20  # largest file the program may write, its own stderr included
_TMP_BYTES = 16 << 20  # its writable /tmp (isolated mode)
_FIRST_DYNAMIC_UID = 1 << 30  # root's sandboxes run as a fresh uid from here (owned by no one)

# The zygote (sandbox_zygote.py) runs by path: at its own path in process mode, bound read-only
# at this path in the isolated sandbox, whose view holds nothing else of the package.
_ZYGOTE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_zygote.py")
_ZYGOTE_IN_SANDBOX = "/zygote.py"


class Program(typing.NamedTuple):
    """A program to score: run `setup`, then `code`, then each test, in one namespace."""
    code: str
    tests: Sequence[str] = ()
    setup: str = ""


@dataclass(frozen=True)
class ExecResult:
    passed: bool
    status: str  # passed | failed | timeout | error (does not compile, or the sandbox broke)
    reason: str = ""  # why it did not pass
    stderr_tail: str = ""


class SandboxUnavailable(RuntimeError):
    """Isolation was asked for and this machine cannot give it."""


def _interpreter() -> str:
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _view() -> list[str]:
    """bwrap mount arguments: read-only what the interpreter needs and the zygote, a private
    /tmp."""
    stdlib = os.path.dirname(os.path.realpath(os.__file__))
    wanted = ["/usr", _interpreter(), stdlib, sysconfig.get_config_var("LIBDIR") or stdlib]
    binds: list[str] = []
    for path in sorted({os.path.realpath(p) for p in wanted}):
        if os.path.exists(path) and not any(path.startswith(os.path.join(b, "")) for b in binds):
            binds.append(path)
    args = []
    parents = sorted({os.path.dirname(p[: i + 1]) for p in binds for i, c in enumerate(p) if c == "/"})
    for parent in parents[1:]:  # bwrap would make them 0700, closed to a uid dropped from root
        args += ["--perms", "0755", "--dir", parent]
    for path in binds:
        args += ["--ro-bind", path, path]
    for link in ("/bin", "/lib", "/lib32", "/lib64", "/libx32", "/sbin"):  # merged /usr
        if os.path.islink(link):
            args += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            args += ["--ro-bind", link, link]
    if os.path.exists("/etc/ld.so.cache"):
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    args += ["--ro-bind", _ZYGOTE, _ZYGOTE_IN_SANDBOX]
    site = os.path.join(stdlib, "site-packages")
    if os.path.isdir(site):  # installed packages are not the program's business
        args += ["--tmpfs", site]
    # no --proc: Python needs none, and a fresh procfs cannot be mounted in many containers
    return args + ["--dev", "/dev", "--perms", "1777", *_if_supported("--size", str(_TMP_BYTES)),
                   "--tmpfs", "/tmp", "--chdir", "/tmp"]


@functools.lru_cache(maxsize=1)
def _bwrap_options() -> str:
    bwrap = shutil.which("bwrap")
    return subprocess.run([bwrap, "--help"], capture_output=True, text=True).stdout if bwrap else ""


def _if_supported(option: str, *values: str) -> list[str]:
    """Options newer than some distributions' bwrap (--size 0.7, --disable-userns 0.8): used where
    this bwrap has them; what is then missing is in the README's list of non-guarantees."""
    return [option, *values] if f"{option} " in _bwrap_options() else []


@functools.lru_cache(maxsize=1)
def _bwrap_command() -> tuple[str, ...]:
    bwrap = shutil.which("bwrap") or "bwrap"
    args = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--clearenv",
            "--setenv", "PYTHONHASHSEED", "0", "--hostname", "sandbox", "--cap-drop", "ALL"]
    if os.geteuid() == 0:  # a user namespace would map the sandbox to root: drop to a fresh uid
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", *_if_supported("--disable-userns")]
    return (*args, *_view())


def _sandbox_uid() -> int | None:
    """As root, a uid no one else runs as (one of 2**28 at random: sandboxes of other processes
    draw too), so the process rlimit and the zygote's reaper count this program alone."""
    if os.geteuid() != 0:
        return None
    return _FIRST_DYNAMIC_UID + secrets.randbelow(1 << 28)


def _limits(timeout_s: float, memory_mb: int, max_output_bytes: int) -> list[tuple[str, int, int]]:
    # A second past the wall clock: one thread always meets the wall clock first (a deterministic
    # reason); the CPU limit catches threads that burn CPU faster than time passes.
    cpu = int(timeout_s) + 1  # SIGXCPU at the soft limit, SIGKILL a second later
    fixed = [("RLIMIT_AS", memory_mb << 20), ("RLIMIT_FSIZE", max(_FILE_LIMIT, max_output_bytes)),
             ("RLIMIT_CORE", 0), ("RLIMIT_NOFILE", _MAX_OPEN_FILES), ("RLIMIT_NPROC", _MAX_PROCESSES)]
    return [("RLIMIT_CPU", cpu, cpu + 1)] + [(name, value, value) for name, value in fixed]


class _Sandbox:
    """One sandbox (bwrap and the zygote in it; in process mode the zygote alone, for one job)
    that runs jobs one at a time; isolated, it serves job after job while the zygote reports
    each one's leftovers gone."""

    def __init__(self, mode: str):
        self.reusable = mode == "isolated"
        self._stack = contextlib.ExitStack()
        self._err = self._stack.enter_context(tempfile.TemporaryFile())  # bwrap's own complaints
        self._kill = None
        python = [_interpreter(), "-S", "-B"]
        if mode == "isolated":
            info_r, info_w = os.pipe()
            argv = [*_bwrap_command(), "--info-fd", str(info_w), *python, _ZYGOTE_IN_SANDBOX,
                    "/tmp", mode]
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._err, env={}, pass_fds=(info_w,),
                                         start_new_session=True)
            os.close(info_w)
            with os.fdopen(info_r) as info:  # written once the sandbox exists; closed if it fails
                init = json.loads(info.read() or "{}").get("child-pid")
            # The sandbox's init lives as long as the zygote, which waits for its first job: it is
            # alive now, and a pidfd names it (never a reused pid) until we close it. Killing it
            # kills everything in the PID namespace, and bwrap exits after them.
            if init:
                with contextlib.suppress(ProcessLookupError):
                    pidfd = os.pidfd_open(init)
                    self._stack.callback(os.close, pidfd)
                    self._kill = functools.partial(signal.pidfd_send_signal, pidfd, signal.SIGKILL)
        else:
            work = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="spd-sandbox-"))
            self.proc = subprocess.Popen([*python, _ZYGOTE, work, mode], cwd=work,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._err,
                                         env={"PYTHONHASHSEED": "0"}, start_new_session=True)

    def run(self, job: Job) -> Answer | None:
        """The zygote's answer to `job`, or None if the sandbox broke (it is then closed)."""
        data = marshal.dumps(tuple(job))
        try:
            self.proc.stdin.write(len(data).to_bytes(4, "big") + data)
            self.proc.stdin.flush()
            deadline = time.monotonic() + job.timeout_s + _GRACE_S
            header = self._read(4, deadline)
            return Answer._make(marshal.loads(self._read(int.from_bytes(header, "big"), deadline)))
        except (OSError, EOFError, ValueError, TimeoutError):
            self.close()
            return None

    def _read(self, n: int, deadline: float) -> bytes:
        data, fd = b"", self.proc.stdout.fileno()
        while len(data) < n:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError
            chunk = os.read(fd, n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def complaints(self) -> str:
        self._err.seek(0)
        return self._err.read().decode(errors="replace").strip()

    def close(self) -> None:
        """Everything the sandbox ran is gone when this returns."""
        if self.proc.returncode is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    (self._kill or self.proc.kill)()
                self.proc.wait()
        self.proc.stdout.close()

    def __enter__(self) -> _Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        self._stack.close()


_GRACE_S = 10.0  # past a job's own timeout, for killing and cleaning up, before the sandbox is dropped


def _job(program: Program, mode: str, timeout_s: float, memory_mb: int,
         max_output_bytes: int) -> Job:
    code, tests, setup = program
    parts = [("setup", setup), ("program", code), *((f"test {i + 1}", t) for i, t in enumerate(tests))]
    uid = _sandbox_uid() if mode == "isolated" else None
    return Job(secrets.token_hex(16), uid, _limits(timeout_s, memory_mb, max_output_bytes), parts,
               timeout_s, max_output_bytes)


def _run_on(box: _Sandbox, job: Job) -> tuple[ExecResult, bool]:
    """The job's result, and whether `box` can take another job."""
    answer = box.run(job)
    if answer is None:
        why = box.complaints()[-300:] or "no answer"
        return ExecResult(False, "error", f"the sandbox ended without a result: {why}"), False
    return _verdict(answer, job), box.reusable and answer.clean


def run_program(code: str, tests: Sequence[str] = (), setup: str = "", *,
                mode: str = EvalConfig.sandbox, timeout_s: float = EvalConfig.code_timeout_s,
                memory_mb: int = MEMORY_MB, max_output_bytes: int = MAX_OUTPUT_BYTES) -> ExecResult:
    """Run `setup`, then `code`, then each test in one namespace, in a sandbox of its own; it
    passes when the last test has finished. status "error": it does not compile; "timeout": past
    `timeout_s` (wall clock or CPU time); "failed": anything else, `reason` says what."""
    if mode not in MODES:
        raise ValueError(f"unknown sandbox mode {mode!r}; valid modes: {list(MODES)}")
    if mode == "isolated":
        require_isolation()
    with _Sandbox(mode) as box:
        return _run_on(box, _job(Program(code, tests, setup), mode, timeout_s, memory_mb,
                                 max_output_bytes))[0]


def _verdict(answer: Answer, job: Job) -> ExecResult:
    tail, code = answer.tail.decode(errors="replace"), answer.code
    line = answer.result.split(b"\n", 1)[0].decode(errors="replace")
    if line.startswith(job.secret + " "):  # only the harness knows the secret: line 1 counts
        status, _, reason = line[len(job.secret) + 1 :].partition(" ")
        return ExecResult(status == "passed", status, reason, tail)
    if answer.timed_out:
        return ExecResult(False, "timeout", f"ran past the {job.timeout_s:g} s wall-clock limit",
                          tail)
    if code == -signal.SIGXCPU:
        return ExecResult(False, "timeout", "ran past the CPU-time limit", tail)
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    return ExecResult(False, "failed", f"no result from the harness ({how}): it ended before "
                      "its tests finished", tail)


_ISOLATION_CHECK = """
import os, socket
assert [name for _, name in socket.if_nameindex()] == ["lo"], "network namespace"
assert (os.getpid(), os.getppid()) == (3, 2), "PID namespace"  # init 1, zygote 2
assert os.getuid() != 0, "uid"
assert set(os.environ) <= {{"PYTHONHASHSEED", "PWD", "LC_CTYPE"}}, "environment"
assert os.listdir(".") == [] and not os.path.exists({here!r}), "file system"
assert not os.path.exists("/proc/self"), "no /proc"
"""


@functools.lru_cache(maxsize=1)
def isolation() -> dict:
    """What isolation this machine gives: {"available": bool, ...}; probed once per process."""
    facts = {"bwrap": shutil.which("bwrap"), "caller": "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"}
    if not facts["bwrap"]:
        return {**facts, "available": False, "missing": "bubblewrap (bwrap) is not installed",
                "fix": "install it: apt-get install bubblewrap (Debian/Ubuntu), dnf install "
                       "bubblewrap (Fedora/RHEL), pacman -S bubblewrap (Arch)"}
    version = subprocess.run([facts["bwrap"], "--version"], capture_output=True, text=True)
    facts["bwrap_version"] = version.stdout.strip()
    facts["bwrap_lacks"] = [opt for opt in ("--size", "--disable-userns") if not _if_supported(opt)]
    check = _ISOLATION_CHECK.format(here=os.path.dirname(os.path.abspath(__file__)))
    with _Sandbox("isolated") as box:
        answer = box.run(Job("probe", _sandbox_uid(), [], [("check", check)], 30.0, 1000))
        complaints = box.complaints()
    result = (answer.result if answer else b"").decode(errors="replace").strip()
    if result == "probe passed":
        runs_as = ("a fresh unprivileged uid (caller is root)" if os.geteuid() == 0
                   else "the caller's uid in a user namespace without capabilities")
        return {**facts, "available": True, "runs_as": runs_as,
                "namespaces": ["pid", "net", "mount", "ipc", "uts"] + ([] if os.geteuid() == 0 else ["user"])}
    if result.startswith("probe "):  # the sandbox started but leaks: a setup we do not know
        return {**facts, "available": False, "missing": f"the sandbox is not isolated ({result})",
                "fix": "report it with the output of python -m spd_ray.tasks.sandbox"}
    why = (complaints or result or "no answer")[-500:]
    return {**facts, "available": False, "missing": f"bwrap could not build the sandbox: {why}",
            "fix": "allow unprivileged user namespaces (sysctl user.max_user_namespaces=15000; "
                   "Debian < 11: kernel.unprivileged_userns_clone=1; Ubuntu 23.10+: "
                   "kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile for "
                   "bwrap); in a container, allow namespaces (Docker: --security-opt "
                   "seccomp=unconfined; Kubernetes: securityContext.seccompProfile.type: Unconfined)"}


def require_isolation() -> None:
    facts = isolation()
    if not facts["available"]:
        raise SandboxUnavailable(
            f"the isolated sandbox for model-written code is unavailable on {os.uname().nodename}: "
            f"{facts['missing']}. Fix: {facts['fix']}. Or run model code without isolation by "
            "choosing evaluation.sandbox=process (not a security boundary: only on a machine that "
            "holds no secrets)")


def warn_unisolated() -> None:
    log.warning("evaluation.sandbox=process: model-written code runs WITHOUT isolation, as %s, "
                "with this machine's files and network; use it only where nothing is at stake",
                isolation()["caller"])


def _run_local(programs: Sequence[Program], mode: str, timeout_s: float,
               workers: int) -> list[ExecResult]:
    if mode == "isolated":
        require_isolation()  # on this node, once, before any program
    idle: queue.SimpleQueue = queue.SimpleQueue()  # sandboxes that can take another job

    def run(program: Program) -> ExecResult:
        try:
            box = idle.get_nowait()
        except queue.Empty:
            box = _Sandbox(mode)
        result, again = _run_on(box, _job(program, mode, timeout_s, MEMORY_MB, MAX_OUTPUT_BYTES))
        idle.put(box) if again else box.close()
        return result

    try:
        with ThreadPoolExecutor(workers) as pool:  # each thread only waits on its sandbox
            return list(pool.map(run, programs))
    finally:
        while not idle.empty():
            idle.get_nowait().close()


_CHUNK = 16  # programs per Ray task: a few hundred tiny programs make a few dozen tasks
# A task reserves one CPU and keeps two programs going: a sleeping or timed-out one should not
# idle the CPU.
_TASK_THREADS = 2
# A task that dies with its node is retried elsewhere; a SandboxUnavailable is not retried.
_run_chunk = ray.remote(num_cpus=1, max_retries=3)(_run_local)


def run_many(programs: Sequence[Program], *, mode: str = EvalConfig.sandbox,
             timeout_s: float = EvalConfig.code_timeout_s, max_workers: int | None = None) -> list[ExecResult]:
    """`Program`s (or (code, tests, setup) triples) run in parallel; results keep the input order.

    With Ray initialized, chunks of `_CHUNK` programs run as Ray tasks (`max_workers` programs at
    a time per task, default `_TASK_THREADS`); otherwise threads here (default: one per CPU)."""
    if mode not in MODES:
        raise ValueError(f"unknown sandbox mode {mode!r}; valid modes: {list(MODES)}")
    if mode == "process":
        warn_unisolated()
    if not ray.is_initialized():
        return _run_local(programs, mode, timeout_s, max_workers or os.cpu_count() or 1)
    chunks = [programs[i : i + _CHUNK] for i in range(0, len(programs), _CHUNK)]
    refs = [_run_chunk.remote(c, mode, timeout_s, max_workers or _TASK_THREADS) for c in chunks]
    sizes = {ref: len(c) for ref, c in zip(refs, chunks)}
    with console.progress("running programs", len(programs), unit="programs") as bar:
        pending = refs
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            bar.update(sizes[ready[0]])
    return [result for chunk in ray.get(refs) for result in chunk]


if __name__ == "__main__":
    facts = isolation()
    print(json.dumps(facts, indent=1))
    sys.exit(0 if facts["available"] else 1)
