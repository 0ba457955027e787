"""Running model-written Python for scoring: one throwaway sandbox per program.

A pass means the tests ran to the end. Inside the sandbox a small harness runs the setup, the
program and then each test, and only after the last test writes a result line that starts with a
per-run secret the program is never given (it arrives on stdin with the job, which the harness
reads and closes first). An early exit (exit(), sys.exit, SystemExit, os._exit, an atexit hook),
a signal, a timeout or a missing or unsigned result line is a failure, with its reason.

Mode "isolated" (the default) is the kernel's isolation, through bubblewrap (`bwrap`):
- its own PID namespace: it sees and can signal only its own processes, and everything it
  started is killed when the harness exits or the time runs out;
- its own network namespace with nothing but a loopback of its own: no host loopback
  services, no cloud metadata endpoint, no network at all; its own IPC and UTS namespaces;
- its own mount namespace: read-only /usr and the interpreter's standard library (its
  site-packages hidden), a minimal /dev, and a private 16 MiB tmpfs at /tmp as its working
  directory; nothing else of the host's filesystem, and no /proc at all;
- an unprivileged uid with no capabilities and no_new_privs: a fresh uid that owns nothing
  when the caller is root, else the caller's uid mapped into a user namespace that may not
  create further user namespaces;
- an environment holding only PYTHONHASHSEED=0 (so set order, and so scores, are reproducible),
  and the PWD and LC_CTYPE that bwrap and Python set;
- rlimits set before the program runs (CPU time, address space, file size, open files,
  processes, no core dumps), a wall-clock timeout, and output capped by the file-size limit.
Mode "process" runs the same harness as a plain child process with the same rlimits, timeout,
empty environment and throwaway working directory, and nothing else: the program runs as the
caller, sees the caller's files and network, and a child that leaves the process group can
outlive it. It exists for machines that cannot isolate; choosing it is logged as a warning.

Not guaranteed, in either mode: a program that deliberately inspects the harness's own memory
(its frames or file descriptors) can forge its own pass, since it runs in the same interpreter
as its tests; so can one that returns objects that compare equal to anything. Isolation keeps
such a program from harming anything outside, but only execution that is not in-process could
make its score trustworthy. There is no cgroup: total memory is bounded only by processes x
address-space limit, and no seccomp filter narrows the system calls the kernel offers.

`run_many` runs programs in parallel: as Ray tasks when Ray is initialized, threads otherwise.
`python -m spd_ray.sandbox` prints what isolation this machine gives.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import marshal
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ray

MODES = ("isolated", "process")
log = logging.getLogger(__name__)

_MAX_PROCESSES = 16  # the harness included: a fork bomb stops here
_MAX_OPEN_FILES = 64
_FILE_LIMIT = 1 << 20  # largest file the program may write, its own stderr included
_TMP_BYTES = 16 << 20  # its writable /tmp (isolated mode)
_RESULT_BYTES = 4096  # the harness's result line; the program cannot make us read more
_FIRST_DYNAMIC_UID = 1 << 30  # root's sandboxes run as a fresh uid from here (owned by no one)

# Runs in the sandbox (python -S -B -c). Only builtin modules before the program starts, so
# start-up stays cheap; marshal reads the job without importing anything.
_HARNESS = r"""
import marshal, os, resource, sys
secret, uid, limits, parts = marshal.loads(sys.stdin.buffer.read())
result = os.dup(1)
null = os.open("/dev/null", os.O_RDWR)
os.dup2(null, 0), os.dup2(null, 1), os.close(null)  # the program's stdin and stdout go nowhere
def report(status, reason="", _write=os.write, _exit=os._exit, _fd=result, _key=secret,
           _flush=sys.stderr.flush):
    # bound now: a program that rebinds os.write or os._exit cannot change what this does
    try:
        _flush()  # what the program wrote to stderr, for the caller's tail
    except BaseException:
        pass
    _write(_fd, f"{_key} {status} {reason}"[:2000].encode("utf-8", "replace") + b"\n")
    _exit(0)  # nothing of the program runs after its result: no atexit hook, no thread
del secret
def describe(err):
    try:
        text = str(err)
        return f"{type(err).__name__}: {text}"[:500] if text else type(err).__name__
    except BaseException:
        return type(err).__name__
if uid is not None:  # root outside: bwrap left CAP_SETUID/SETGID for this drop and nothing else
    os.setgroups([]), os.setresgid(uid, uid, uid), os.setresuid(uid, uid, uid)
    try:  # setting a uid from a non-root one needs the capability the drop must have cleared
        os.setuid(0)
    except PermissionError:
        pass
    else:
        report("error", "sandbox: could not drop privileges")
for name, soft, hard in limits:
    resource.setrlimit(getattr(resource, name), (soft, hard))
try:
    code = [(name, compile(src, f"<{name}>", "exec", dont_inherit=True, optimize=0))
            for name, src in parts]
except (SyntaxError, ValueError) as err:  # ValueError: null bytes (Python < 3.12)
    report("error", describe(err))
import builtins, types
builtins.exit = builtins.quit = sys.exit  # -S leaves them undefined
# Like the HumanEval/MBPP harnesses, __name__ is not "__main__": a completion's demo block
# (which often reads stdin) does not run. A registered module keeps pickle/dataclasses working.
module = sys.modules["__sandbox__"] = types.ModuleType("__sandbox__")
for name, obj in code:
    try:
        exec(obj, module.__dict__)
    except SystemExit as err:
        report("failed", f"{name} exited early ({describe(err)}) before the tests finished")
    except BaseException as err:
        report("failed", f"{name}: {describe(err)}")
report("passed")
"""


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
    """bwrap mount arguments: read-only what the interpreter needs, a private /tmp."""
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


_calls = itertools.count()


def _sandbox_uid() -> int | None:
    """As root, a uid no one else runs as, so the process rlimit counts this sandbox alone."""
    if os.geteuid() != 0:
        return None
    return _FIRST_DYNAMIC_UID + ((os.getpid() << 16) + next(_calls)) % (1 << 28)


def _limits(timeout_s: float, memory_mb: int, max_output_bytes: int) -> list[tuple[str, int, int]]:
    cpu = max(1, int(timeout_s + 0.999))  # SIGXCPU at the soft limit, SIGKILL a second later
    fixed = [("RLIMIT_AS", memory_mb << 20), ("RLIMIT_FSIZE", max(_FILE_LIMIT, max_output_bytes)),
             ("RLIMIT_CORE", 0), ("RLIMIT_NOFILE", _MAX_OPEN_FILES), ("RLIMIT_NPROC", _MAX_PROCESSES)]
    return [("RLIMIT_CPU", cpu, cpu + 1)] + [(name, value, value) for name, value in fixed]


def run_program(code: str, tests: Sequence[str] = (), setup: str = "", *, mode: str = "isolated",
                timeout_s: float = 5.0, memory_mb: int = 512,
                max_output_bytes: int = 10_000) -> ExecResult:
    """Run `setup`, then `code`, then each test in one namespace; it passes when the last test
    has finished. status "error": it does not compile; "timeout": past `timeout_s` (wall clock
    or CPU time); "failed": anything else, `reason` says what."""
    if mode not in MODES:
        raise ValueError(f"unknown sandbox mode {mode!r}; valid modes: {list(MODES)}")
    if mode == "isolated":
        require_isolation()
    parts = [("setup", setup), ("program", code), *((f"test {i + 1}", t) for i, t in enumerate(tests))]
    secret = secrets.token_hex(16)
    uid = _sandbox_uid() if mode == "isolated" else None
    job = marshal.dumps((secret, uid, _limits(timeout_s, memory_mb, max_output_bytes), parts))
    out, err = _execute(job, mode, timeout_s)
    tail = err[-max_output_bytes:].decode(errors="replace") if max_output_bytes else ""
    return _verdict(out, secret, tail, timeout_s)


def _execute(job: bytes, mode: str, timeout_s: float) -> tuple[tuple[int, bool, bytes], bytes]:
    """Start the harness on `job`; returns ((exit status, timed out, result bytes), stderr).
    Everything the program started is gone when this returns."""
    harness = [_interpreter(), "-S", "-B", "-c", _HARNESS]
    with contextlib.ExitStack() as stack:
        # stdout/stderr go to files so RLIMIT_FSIZE caps them (a pipe would buffer without bound)
        out, err = (stack.enter_context(tempfile.TemporaryFile()) for _ in range(2))
        if mode == "isolated":
            info_r, info_w = os.pipe()
            cmd = [*_bwrap_command(), "--info-fd", str(info_w), *harness]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, env={},
                                    pass_fds=(info_w,), start_new_session=True)
            os.close(info_w)
            with os.fdopen(info_r) as info:  # written once the sandbox exists; closed if it fails
                init = json.loads(info.read() or "{}").get("child-pid")  # None: bwrap failed
            # The sandbox's init waits for its harness, which waits for the job on stdin: it is
            # alive now, and a pidfd names it (never a reused pid) until we close it.
            kill = proc.kill  # no sandbox was made: bwrap alone
            with contextlib.suppress(ProcessLookupError):
                if init:
                    pidfd = os.pidfd_open(init)
                    stack.callback(os.close, pidfd)
                    kill = functools.partial(signal.pidfd_send_signal, pidfd, signal.SIGKILL)
        else:
            work = stack.enter_context(tempfile.TemporaryDirectory(prefix="spd-sandbox-"))
            proc = subprocess.Popen(harness, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work,
                                    env={"PYTHONHASHSEED": "0"}, start_new_session=True)
            kill = functools.partial(os.killpg, proc.pid, signal.SIGKILL)
        timed_out = False
        try:
            proc.communicate(job, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # isolated: killing the PID namespace's init kills all in it, and bwrap exits after
            # them; if the harness ended, the kernel has done so already. process mode: the
            # process group (a child that left it is not ours to find).
            if timed_out or mode == "process":
                with contextlib.suppress(ProcessLookupError):
                    kill()
            proc.wait()
        out.seek(0), err.seek(0)
        return (proc.returncode, timed_out, out.read(_RESULT_BYTES)), err.read()


def _verdict(out: tuple[int, bool, bytes], secret: str, tail: str, timeout_s: float) -> ExecResult:
    rc, timed_out, result = out
    line = result.split(b"\n", 1)[0].decode(errors="replace")
    if line.startswith(secret + " "):  # only the harness knows the secret: the first line counts
        status, _, reason = line[len(secret) + 1 :].partition(" ")
        return ExecResult(status == "passed", status, reason, tail)
    if timed_out:
        return ExecResult(False, "timeout", f"ran past the {timeout_s:g} s wall-clock limit", tail)
    sig = -rc if rc < 0 else rc - 128 if rc > 128 else 0  # bwrap reports a signal as 128 + n
    if sig == signal.SIGXCPU:
        return ExecResult(False, "timeout", "ran past the CPU-time limit", tail)
    how = f"killed by {signal.Signals(sig).name}" if sig in signal.valid_signals() and sig else f"exit status {rc}"
    return ExecResult(False, "failed", f"no result from the harness ({how}): it ended before "
                      "its tests finished", tail)


_ISOLATION_CHECK = """
import os, socket
assert [name for _, name in socket.if_nameindex()] == ["lo"], "network namespace"
assert (os.getpid(), os.getppid()) == (2, 1), "PID namespace"
assert os.getuid() != 0, "uid"
assert set(os.environ) <= {{"PYTHONHASHSEED", "PWD", "LC_CTYPE"}}, "environment"
assert os.listdir("/tmp") == [] and not os.path.exists({here!r}), "file system"
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
    out, err = _execute(marshal.dumps(("probe", _sandbox_uid(), [], [("check", _ISOLATION_CHECK.format(here=os.path.dirname(os.path.abspath(__file__))))])),
                        "isolated", 30.0)
    result = out[2].decode(errors="replace").strip()
    if result == "probe passed":
        runs_as = ("a fresh unprivileged uid (caller is root)" if os.geteuid() == 0
                   else "the caller's uid in a user namespace without capabilities")
        return {**facts, "available": True, "runs_as": runs_as,
                "namespaces": ["pid", "net", "mount", "ipc", "uts"] + ([] if os.geteuid() == 0 else ["user"])}
    if result.startswith("probe "):  # the sandbox started but leaks: a setup we do not know
        return {**facts, "available": False, "missing": f"the sandbox is not isolated ({result})",
                "fix": "report it with the output of python -m spd_ray.sandbox"}
    why = (err.decode(errors="replace").strip() or result)[-500:]
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


def _run_local(jobs: Sequence[tuple[str, Sequence[str], str]], mode: str, timeout_s: float,
               workers: int) -> list[ExecResult]:
    if mode == "isolated":
        require_isolation()  # on this node, once, before any program
    run = lambda job: run_program(job[0], job[1], job[2], mode=mode, timeout_s=timeout_s)  # noqa: E731
    with ThreadPoolExecutor(workers) as pool:  # each thread only waits on its sandbox
        return list(pool.map(run, jobs))


_CHUNK = 16  # programs per Ray task: a few hundred tiny programs make a few dozen tasks
# A task reserves one CPU and keeps two programs going: most of a short program's time is
# interpreter start-up, and a sleeping or timed-out one should not idle the CPU.
_TASK_THREADS = 2
# A task that dies with its node is retried elsewhere; a SandboxUnavailable is not retried.
_run_chunk = ray.remote(num_cpus=1, max_retries=3)(_run_local)


def run_many(jobs: Sequence[tuple[str, Sequence[str], str]], *, mode: str = "isolated",
             timeout_s: float = 5.0, max_workers: int | None = None) -> list[ExecResult]:
    """(program, tests, setup) triples run in parallel; results keep the input order.

    With Ray initialized, chunks of `_CHUNK` programs run as Ray tasks (`max_workers` programs at
    a time per task, default `_TASK_THREADS`); otherwise threads here (default: one per CPU)."""
    if mode not in MODES:
        raise ValueError(f"unknown sandbox mode {mode!r}; valid modes: {list(MODES)}")
    if mode == "process":
        warn_unisolated()
    if not ray.is_initialized():
        return _run_local(jobs, mode, timeout_s, max_workers or os.cpu_count() or 1)
    chunks = [jobs[i : i + _CHUNK] for i in range(0, len(jobs), _CHUNK)]
    refs = [_run_chunk.remote(c, mode, timeout_s, max_workers or _TASK_THREADS) for c in chunks]
    return [result for chunk in ray.get(refs) for result in chunk]


if __name__ == "__main__":
    facts = isolation()
    print(json.dumps(facts, indent=1))
    sys.exit(0 if facts["available"] else 1)
