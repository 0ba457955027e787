"""The sandbox for model-written code: passes that cannot be faked, and one test per way out.

Each escape test runs the same program in the isolated sandbox, where it must be contained with
nothing outside changed, and in the unisolated "process" mode, where the same check must see
it get out: so every check is shown to catch an escape when there is one."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from spd_ray.tasks import sandbox
from spd_ray.tasks.sandbox import Program, SandboxUnavailable, run_many, run_program

pytestmark = pytest.mark.isolated  # skipped, visibly, where the machine cannot isolate (not in CI)

SOLUTION = "def add(x):\n    return x + 1\n"
TESTS = ["assert add(1) == 2", "assert add(-1) == 0"]
# a wrong solution, then each way a program can end its process "successfully" before its tests
FAKE_PASSES = [
    "exit()", "quit()", "import sys\nsys.exit(0)", "raise SystemExit", "raise SystemExit(0)",
    "import os\nos._exit(0)", "import atexit, os\natexit.register(os._exit, 0)",
    "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)",
    "import threading, os\nthreading.Thread(target=os._exit, args=(0,)).start()\nimport time\ntime.sleep(1)",
    # forged result lines on every descriptor the program may hold, then a quiet exit
    "import os\nfor fd in range(3, 64):\n    try: os.write(fd, b'passed\\n')\n    except OSError: pass\n"
    "print('passed')\nos._exit(0)",
]


@pytest.mark.parametrize("mode", sandbox.MODES)
def test_known_correct_programs_pass_and_wrong_ones_fail(mode):
    ok = run_program(SOLUTION, TESTS, mode=mode)
    assert ok == sandbox.ExecResult(True, "passed", "", "")
    wrong = run_program(SOLUTION, ["assert add(1) == 2", "assert add(1) == 3"], mode=mode)
    assert not wrong.passed and wrong.status == "failed" and wrong.reason == "test 2: AssertionError"
    assert run_program("x = add(1)", ["assert x == 2"], setup=SOLUTION, mode=mode).passed
    # the program may start with a future import even after a setup; stdlib imports work
    code = "from __future__ import annotations\nimport heapq, re, json, inspect\n" \
           "def f(xs: list[int]) -> list[int]:\n    return heapq.nsmallest(2, xs)\n"
    assert run_program(code, ["assert f([5, 1, 4]) == [1, 4]",
                              "assert inspect.getsource(json.dumps).startswith('def dumps')"],
                       setup="import math", mode=mode).passed


@pytest.mark.parametrize("mode", sandbox.MODES)
@pytest.mark.parametrize("ending", FAKE_PASSES)
def test_an_early_exit_is_never_a_pass(ending, mode):
    result = run_program("def add(x):\n    return None\n" + ending, TESTS, mode=mode, timeout_s=3)
    assert not result.passed and result.status in ("failed", "timeout"), result
    assert result.reason


def test_failure_reasons():
    assert run_program("exit(0)").reason == "program exited early (SystemExit: 0) before the tests finished"
    assert run_program("import os\nos._exit(0)").reason.startswith("no result from the harness (exit status 0)")
    assert run_program("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)").reason.startswith(
        "no result from the harness (killed by SIGKILL)")
    assert run_program("raise ValueError('bad')").reason == "program: ValueError: bad"
    assert run_program("x = 1", ["exit()"]).reason.startswith("test 1 exited early")


@pytest.mark.parametrize("code", ["def f(:\n", "x = 1\n\0\n", "if True:\nreturn 1\n"])
def test_syntax_error_is_error(code):
    result = run_program(code, TESTS)
    assert not result.passed and result.status == "error" and result.reason


def test_program_runs_as_a_module_not_as_main():
    code = "import dataclasses, pickle\n@dataclasses.dataclass\nclass P:\n    x: int\n"
    code += "assert pickle.loads(pickle.dumps(P(1))) == P(1)\n"
    code += "if __name__ == '__main__':\n    input()\n"  # a demo block that reads stdin: not run
    assert run_program(code).passed


def test_hash_seed_is_fixed():
    code = "import sys\nprint(hash('abc'), file=sys.stderr)"
    assert run_program(code).stderr_tail == run_program(code).stderr_tail != ""


# ------------------------------------------------------------------------------------------
# Limits


def test_wall_clock_and_cpu_limits():
    for code in ("while True:\n    pass\n", "import time\ntime.sleep(100)\n"):
        start = time.monotonic()
        result = run_program(code, timeout_s=1)
        assert result.status == "timeout" and time.monotonic() - start < 3, result
    # a CPU limit a second past the wall clock: for the threads of a program that burn CPU faster
    # than time passes (one thread meets the wall clock first, on a busy machine too)
    code = "import resource\nassert resource.getrlimit(resource.RLIMIT_CPU) == (3, 4)"
    assert run_program(code, timeout_s=2).passed
    assert run_program("import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))").reason \
        .startswith("program: ValueError")  # the hard limit cannot be raised


def test_memory_file_size_open_files_and_processes_are_limited():
    for code in ("x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(bytearray(10**7))\n"):
        result = run_program(code, memory_mb=256)
        assert result.status == "failed" and "MemoryError" in result.reason, result
    big = run_program("open('big', 'wb').write(b'x' * (2 << 20))")
    assert big.status == "failed" and "File too large" in big.reason, big
    files = run_program("fs = [open(f'f{i}', 'w') for i in range(200)]")
    assert files.status == "failed" and "Too many open files" in files.reason, files
    bomb = "import os\npids = []\nwhile True:\n    pid = os.fork()\n    if pid == 0:\n" \
           "        import time\n        time.sleep(30)\n    pids.append(pid)"
    result = run_program(bomb, timeout_s=5)
    assert result.status == "failed" and "Resource temporarily unavailable" in result.reason, result


def test_huge_output_is_capped():
    code = "import sys\nfor _ in range(10**5):\n    sys.stderr.write('x' * 100)\nraise SystemExit(1)"
    result = run_program(code, max_output_bytes=1000)
    assert not result.passed and len(result.stderr_tail) == 1000
    # a traceback after lots of output is still in the tail; stdout is discarded
    code = "print('y' * 10**7)\nimport sys\nsys.stderr.write('z' * 5000 + 'the end')"
    result = run_program(code, max_output_bytes=1000)
    assert result.passed and result.stderr_tail.endswith("zthe end") and "y" not in result.stderr_tail


# ------------------------------------------------------------------------------------------
# Escapes. Each program tries to get out and reports on stderr what it reached; the test then
# checks the outside. `contained(mode)` is what the check must find in that mode.


def contained(mode: str) -> bool:
    return mode == "isolated"


def try_each(imports: str, *attempts: str) -> str:
    """A program that makes every attempt in turn, whatever each one raises."""
    calls = "".join(f"\n                lambda: {a}," for a in attempts)
    return f"import {imports}\nfor attempt in ({calls}):\n    try:\n        attempt()\n    except Exception:\n        pass\n"


@pytest.fixture
def victim(tmp_path):
    """A file outside the sandbox with a secret in it, and its folder."""
    path = tmp_path / "secret.txt"
    path.write_text("TOKEN-1b2c3d")
    return path


READS = {
    "open": "open({p!r}).read()",
    "io.FileIO": "import io\nio.FileIO({p!r}).read().decode()",
    "os.open": "import os\nos.read(os.open({p!r}, os.O_RDONLY), 100).decode()",
    "_io after a reload": "import importlib, io, sys\ndel sys.modules['io']\nimport io\n"
                          "importlib.reload(io)\nio.open({p!r}).read()",
    "posix": "import posix\nposix.read(posix.open({p!r}, posix.O_RDONLY), 100).decode()",
    "ctypes libc": "import ctypes\nlibc = ctypes.CDLL(None)\nbuf = ctypes.create_string_buffer(100)\n"
                   "fd = libc.open({p!r}.encode(), 0)\nassert fd >= 0, 'open failed'\n"
                   "libc.read(fd, buf, 100)\nbuf.value.decode()",
}


@pytest.mark.parametrize("mode", sandbox.MODES)
@pytest.mark.parametrize("how", READS)
def test_files_outside_cannot_be_read(victim, how, mode):
    *lines, last = READS[how].format(p=str(victim)).split("\n")
    code = "\n".join(lines + ["import sys", f"print('read:', {last}, file=sys.stderr)"])
    result = run_program(code, mode=mode)
    assert ("TOKEN-1b2c3d" not in result.stderr_tail) == contained(mode), result
    if contained(mode):
        assert result.status == "failed", result  # it ran, and its read failed


@pytest.mark.parametrize("mode", sandbox.MODES)
def test_project_files_and_the_interpreters_packages_are_not_visible(mode):
    project = Path(__file__).resolve().parent.parent
    code = f"import glob, os\nassert glob.glob({str(project / '*')!r}) == []\n"
    code += "import sysconfig\nassert not glob.glob(os.path.join(sysconfig.get_paths()['purelib'], '*'))"
    assert run_program(code, mode=mode).passed == contained(mode)


@pytest.mark.parametrize("mode", sandbox.MODES)
def test_a_program_imports_from_its_working_directory_and_the_standard_library_only(mode):
    # the zygote runs by path, yet its folder (spd_ray's modules) is not on the program's path
    code = "import json, sys\nprint(json.dumps(sys.path), file=sys.stderr)"
    path = json.loads(run_program(code, mode=mode).stderr_tail)
    assert path[0] == "" and not [p for p in path if "spd_ray" in p or "site-packages" in p], path
    assert run_program("import sandbox_zygote", mode=mode).reason == (
        "program: ModuleNotFoundError: No module named 'sandbox_zygote'")


@pytest.mark.parametrize("mode", sandbox.MODES)
def test_a_hard_link_cannot_reach_a_file_outside(victim, mode):
    code = f"import os\nos.link({str(victim)!r}, 'mine')\nopen('mine', 'w').write('changed')"
    result = run_program(code, mode=mode)
    assert (victim.read_text() == "TOKEN-1b2c3d") == contained(mode), result


@pytest.mark.parametrize("mode", sandbox.MODES)
def test_nothing_is_created_or_deleted_outside(victim, mode):
    folder = victim.parent
    code = try_each("os, sqlite3, shutil",
                    f"sqlite3.connect({str(folder / 'made.db')!r}).execute('create table t(x)')",
                    f"os.mkdir({str(folder / 'made')!r})", f"open({str(folder / 'made.txt')!r}, 'w').write('x')",
                    f"os.remove({str(victim)!r})", f"shutil.rmtree({str(folder)!r})")
    assert run_program(code, mode=mode).passed
    untouched = folder.exists() and sorted(p.name for p in folder.iterdir()) == ["secret.txt"]
    assert untouched == contained(mode)


@pytest.fixture
def listener():
    """A service on the host's loopback; records whether anyone connected."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    seen: list = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                seen.append(server.accept())
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield SimpleNamespace(port=server.getsockname()[1], seen=seen)
    stop.set()
    thread.join()
    server.close()


@pytest.mark.parametrize("mode", sandbox.MODES)
def test_host_loopback_services_cannot_be_reached(listener, mode):
    code = try_each("_socket, socket", f"socket.create_connection(('127.0.0.1', {listener.port}), timeout=1)",
                    f"_socket.socket().connect(('127.0.0.1', {listener.port}))")
    assert run_program(code, mode=mode).passed
    time.sleep(0.5)
    assert (listener.seen == []) == contained(mode)


def test_no_network_at_all():
    code = ("import socket, errno\n"
            "assert [name for _, name in socket.if_nameindex()] == ['lo']\n"
            "for host in ('169.254.169.254', '8.8.8.8'):  # cloud metadata, the internet\n"
            "    try:\n        socket.create_connection((host, 80), timeout=2)\n"
            "    except OSError as err:\n        assert err.errno == errno.ENETUNREACH, err\n"
            "    else:\n        raise AssertionError(host)\n")
    result = run_program(code)
    assert result.passed, result


@pytest.fixture
def host_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("mode", sandbox.MODES)
def test_processes_outside_cannot_be_signalled(host_process, mode):
    code = try_each("os, signal, ctypes", f"os.kill({host_process.pid}, signal.SIGKILL)",
                    f"ctypes.CDLL(None).kill({host_process.pid}, signal.SIGKILL)")
    assert run_program(code, mode=mode).passed
    time.sleep(0.2)
    assert (host_process.poll() is None) == contained(mode)


def test_the_runner_cannot_be_killed():
    # isolated only: in process mode this would kill the test itself
    for code in ("import os\nos.kill(os.getppid(), 9)", "import os\nos.kill(-1, 9)",
                 "import os\nos.kill(1, 9)", "import os\nos.killpg(0, 9)"):
        assert not run_program(code, TESTS).passed
    assert run_program(SOLUTION, TESTS).passed  # still here, still working


def _running(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


@pytest.mark.parametrize("mode", sandbox.MODES)
def test_no_process_outlives_the_run(mode):
    marker = f"{time.time_ns() % 10**6}.{os.getpid()}"  # a sleep no one else runs
    code = (f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n    os._exit(0)\n"
            f"time.sleep(0.3)\n")
    assert run_program(code, mode=mode).passed
    left = _running(marker)
    for pid in left:  # process mode: tidy up what got away
        os.kill(pid, signal.SIGKILL)
    assert (left == []) == contained(mode)


@pytest.mark.parametrize("mode", sandbox.MODES)
def test_secrets_in_the_callers_environment_are_not_visible(mode):
    # the caller (a Ray worker, say) holds a secret in its environment from its start
    code = ("import glob, os, sys\nseen = [repr(dict(os.environ))]\n"
            "paths = ['/proc/self/environ', '/proc/1/environ', f'/proc/{os.getppid()}/environ']\n"
            "for path in paths + glob.glob('/proc/*/environ'):\n"
            "    try:\n        seen.append(open(path, 'rb').read().decode(errors='replace'))\n"
            "    except OSError:\n        pass\nprint(*seen, 'PATHS', len(paths), file=sys.stderr)")
    caller = (f"import json\nfrom spd_ray.tasks.sandbox import run_program\n"
              f"print(json.dumps(run_program({code!r}, mode={mode!r}, max_output_bytes=10**6).stderr_tail))")
    env = {**os.environ, "WANDB_API_KEY": "KEY-9f8e7d"}
    out = subprocess.run([sys.executable, "-c", caller], env=env, capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen.rsplit("PATHS ", 1)[1].strip() == "3" and "PYTHONHASHSEED" in seen  # it looked
    assert ("KEY-9f8e7d" not in seen) == contained(mode)


@pytest.mark.parametrize("mode", sandbox.MODES)
def test_runs_as_an_unprivileged_uid(mode):
    code = "import os\nassert os.getuid() != 0 and os.geteuid() != 0\n"
    code += "for uid in (0, 1):\n    try:\n        os.setuid(uid)\n    except OSError:  # EPERM, or EINVAL in a user namespace\n        pass\n" \
            "    else:\n        raise AssertionError('setuid')\n"
    # as root, process mode runs the program as root; as any other user, both modes refuse setuid
    assert run_program(code, mode=mode).passed == (contained(mode) or os.geteuid() != 0)


# ------------------------------------------------------------------------------------------
# Policy: refusal where isolation is missing, the explicit weak mode, parallel runs.


@pytest.fixture
def fresh_probe():
    caches = (sandbox.isolation, sandbox._bwrap_command, sandbox._bwrap_options)
    [cache.cache_clear() for cache in caches]
    yield
    [cache.cache_clear() for cache in caches]


@pytest.mark.usefixtures("fresh_probe")
def test_isolated_mode_refuses_without_bubblewrap(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match=r"bubblewrap \(bwrap\) is not installed.*apt-get "
                                                 r"install bubblewrap.*evaluation.sandbox=process"):
        run_program(SOLUTION, TESTS)
    with pytest.raises(SandboxUnavailable):
        run_many([(SOLUTION, TESTS, "")])
    assert run_program(SOLUTION, TESTS, mode="process").passed  # the explicit choice still runs


@pytest.mark.usefixtures("fresh_probe")
def test_isolated_mode_refuses_without_user_namespaces(monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"  # what bwrap says where the kernel or a container forbids namespaces
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'bubblewrap 0.8.0' && exit 0\n"
                    "echo 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    facts = sandbox.isolation()
    assert not facts["available"] and "No permissions to create new namespace" in facts["missing"]
    with pytest.raises(SandboxUnavailable, match="user namespaces.*seccompProfile"):
        run_program(SOLUTION, TESTS)


def test_isolation_report_on_this_machine():
    facts = sandbox.isolation()
    assert facts["available"] and {"pid", "net", "mount", "ipc", "uts"} <= set(facts["namespaces"])
    printed = subprocess.run([sys.executable, "-m", "spd_ray.tasks.sandbox"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent.parent)
    assert printed.returncode == 0 and json.loads(printed.stdout)["available"] is True


def test_process_mode_is_logged_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="spd_ray.tasks.sandbox"):
        assert [r.passed for r in run_many([(SOLUTION, TESTS, ""), ("exit()", TESTS, "")],
                                           mode="process")] == [True, False]
    assert "WITHOUT isolation" in caplog.text
    with pytest.raises(ValueError, match="valid modes"):
        run_program(SOLUTION, mode="none")


def test_run_many_keeps_order_and_runs_in_parallel():
    jobs = [(SOLUTION + "import time\ntime.sleep(0.5)\n", [f"assert add({i}) == {i + 1 if i % 2 else -1}"], "")
            for i in range(8)]
    start = time.monotonic()
    results = run_many(jobs, timeout_s=5, max_workers=8)
    assert [r.passed for r in results] == [i % 2 == 1 for i in range(8)]
    assert time.monotonic() - start < 3  # 8 x 0.5 s of sleeping would take 4 s one at a time


def test_run_many_on_ray_tasks_matches_local(local_ray, monkeypatch):
    chunks, task = [], sandbox._run_chunk
    monkeypatch.setattr(sandbox, "_CHUNK", 3)  # 10 programs: 4 tasks, the last one short
    monkeypatch.setattr(sandbox, "_run_chunk", SimpleNamespace(
        remote=lambda chunk, *args: chunks.append(len(chunk)) or task.remote(chunk, *args)))
    jobs = [(SOLUTION, [f"assert add({i}) == {i + 1 if i % 3 else 0}"], "") for i in range(8)]
    jobs += [("import os\nos.kill(os.getppid(), 9)\nos.kill(-1, 9)", [], ""),  # the Ray worker
             ("while True:\n    pass\n", [], "")]  # the wall clock, always first
    on_ray = run_many(jobs, timeout_s=1)
    assert chunks == [3, 3, 3, 1]
    assert on_ray == sandbox._run_local(jobs, "isolated", timeout_s=1, workers=2)
    assert [r.status for r in on_ray] == ["failed", "passed", "passed"] * 2 + ["failed", "passed"] \
        + ["failed", "timeout"]


def test_a_reused_sandbox_keeps_nothing_of_the_last_program():
    marker = f"{time.time_ns() % 10**6}.{os.getpid() + 1}"
    leaver = (f"import os\nopen('/tmp/left.txt', 'w').write('A')\nos.chmod('/tmp/left.txt', 0o666)\n"
              f"os.mkdir('/tmp/d')\nopen('/tmp/d/x', 'w').close()\nos.chmod('/tmp/d', 0o500)\n"
              f"if os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
              f"print(os.getuid(), file=__import__('sys').stderr)")
    looker = "import os, sys\nprint(os.getuid(), sorted(os.listdir('/tmp')), file=sys.stderr)"
    with sandbox._Sandbox("isolated") as box:
        first, again = sandbox._run_on(box, sandbox._job(Program(leaver), "isolated", 5, 512, 1000))
        assert first.passed and again and _running(marker) == []  # its sleeper is gone already
        second, _ = sandbox._run_on(box, sandbox._job(Program(looker), "isolated", 5, 512, 1000))
    uid, listing = second.stderr_tail.split(" ", 1)
    assert second.passed and (uid != first.stderr_tail.strip()) == (os.geteuid() == 0)  # root: a fresh uid
    assert "left.txt" not in listing and "'d'" not in listing  # and none of the last one's files


def test_a_sandbox_that_dies_is_an_error_and_is_replaced():
    with sandbox._Sandbox("isolated") as box:
        threading.Timer(0.5, box._kill).start()
        sleeper = sandbox._job(Program("import time\ntime.sleep(5)"), "isolated", 5, 512, 1000)
        result, again = sandbox._run_on(box, sleeper)
    assert result.status == "error" and result.reason.startswith("the sandbox ended without a result")
    assert not again
    assert run_many([(SOLUTION, TESTS, "")] * 3, max_workers=1) == [sandbox.ExecResult(True, "passed")] * 3
