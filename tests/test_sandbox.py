import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

from spd_ray import sandbox
from spd_ray.sandbox import run_many, run_program, run_tests

SOLUTION = "def add(x):\n    return x + 1\n"


def test_correct_passes_and_wrong_fails():
    ok = run_tests(SOLUTION, ["assert add(1) == 2", "assert add(-1) == 0"])
    assert ok.passed and ok.status == "passed"
    wrong = run_tests(SOLUTION, ["assert add(1) == 3"])
    assert not wrong.passed and wrong.status == "failed" and "AssertionError" in wrong.stderr_tail
    assert run_tests("x = 1\n", ["assert add(1) == 2"], setup=SOLUTION).passed


def test_known_correct_solutions_using_the_stdlib_pass():
    # the read guard must leave imports and stdlib source (inspect, tracebacks) alone
    solutions = [
        ("import heapq\ndef smallest(xs, n):\n    return heapq.nsmallest(n, xs)\n",
         ["assert smallest([5, 1, 4, 2], 2) == [1, 2]"]),
        ("import re\ndef words(s):\n    return re.findall(r'[a-z]+', s)\n",
         ["assert words('ab, cd!') == ['ab', 'cd']"]),
        ("from collections import Counter\ndef top(s):\n    return Counter(s).most_common(1)[0][0]\n",
         ["assert top('abcbb') == 'b'"]),
        ("import inspect, json\ndef src():\n    return inspect.getsource(json.dumps)\n",
         ["assert src().startswith('def dumps')"]),
    ]
    assert all(r.passed for r in run_many(solutions, timeout_s=5))


@pytest.mark.parametrize("code", ["def f(:\n", "x = 1\n\0\n", "if True:\nreturn 1\n"])
def test_syntax_error_is_error(code):
    result = run_program(code)
    assert not result.passed and result.status == "error"


def test_program_runs_as_a_module_not_as_main():
    # future imports must stay first in the file, so the prelude cannot simply be prepended
    code = "from __future__ import annotations\nimport dataclasses, pickle\n"
    code += "@dataclasses.dataclass\nclass P:\n    x: int\nassert pickle.loads(pickle.dumps(P(1))) == P(1)\n"
    code += "if __name__ == '__main__':\n    input()\n"  # a demo block that reads stdin: not run
    assert run_program(code).status == "passed"
    assert run_program("exit(0)").passed and not run_program("exit(3)").passed


def test_hash_seed_is_fixed():
    code = "print(hash('abc'), file=__import__('sys').stderr); raise SystemExit(1)"
    assert run_program(code).stderr_tail == run_program(code).stderr_tail


def test_infinite_loop_is_stopped():
    for code in ("while True:\n    pass\n", "import time\ntime.sleep(100)\n"):  # CPU and wall clock
        start = time.monotonic()
        result = run_program(code, timeout_s=1)
        assert not result.passed and result.status == "timeout" and time.monotonic() - start < 3
    # the CPU limit stops a busy program even where the wall clock would not (a busy machine)
    assert run_program("import resource\nassert resource.getrlimit(resource.RLIMIT_CPU) == (1, 1)",
                       timeout_s=1).passed


def test_unbounded_allocation_fails():
    for code in ("x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(bytearray(10**7))\n"):
        result = run_program(code, timeout_s=5, memory_mb=256)
        assert (
            not result.passed and result.status == "failed" and "MemoryError" in result.stderr_tail
        )


@pytest.mark.parametrize(
    "code",
    [
        "import os\nos.fork()",
        "import os\nos.system('echo hi')",
        "import os\nos.kill(os.getppid(), 9)",
        "import os\nos.popen('echo hi')",
        "import subprocess\nsubprocess.run(['echo', 'hi'])",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()",
        "import socket\ns = socket.socket()",
        "import socket\nsocket.create_connection(('127.0.0.1', 9))",
        "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))",
    ],
)
def test_processes_signals_sockets_and_limits_are_blocked(code):
    result = run_program(code)
    assert result.status == "failed" and "PermissionError" in result.stderr_tail


def test_files_outside_stay_put(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("data")
    for code in (
        f"import os\nos.remove({str(victim)!r})",
        f"import os\nos.unlink({str(victim)!r})",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import pathlib\npathlib.Path({str(victim)!r}).unlink()",
        f"open({str(victim)!r}, 'w').write('gone')",
        f"import pathlib\npathlib.Path({str(victim)!r}).write_text('gone')",
        "open('../../keep.txt', 'w')",
        f"import os\nos.open({str(victim)!r}, os.O_WRONLY | os.O_TRUNC)",
    ):
        assert not run_program(code).passed, code
    assert victim.read_text() == "data"
    # the program starts in an empty throwaway directory, may write there, and sees no inherited env
    code = "import os\nassert os.listdir('.') == [] and 'HOME' not in os.environ\n"
    code += "open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n"
    assert run_program(code).passed
    assert not run_program("open('pyproject.toml')").passed  # the tests' cwd is not the program's
    # deleting is blocked inside the working directory too
    code = "import os\nopen('scratch.txt', 'w').close()\nos.remove('scratch.txt')"
    result = run_program(code)
    assert result.status == "failed" and "PermissionError" in result.stderr_tail


def test_project_files_cannot_be_read():
    project_file, project_dir = Path(__file__).resolve(), Path(__file__).resolve().parent.parent
    assert project_file.exists()
    for code in (
        f"open({str(project_file)!r}).read()",
        f"import pathlib\npathlib.Path({str(project_file)!r}).read_bytes()",
        f"import os\nos.open({str(project_file)!r}, os.O_RDONLY)",
        f"import os\nos.listdir({str(project_dir)!r})",
        f"import os\nos.chdir({str(project_dir)!r})\nopen('pyproject.toml')",
    ):
        result = run_program(code)
        assert result.status == "failed" and "PermissionError" in result.stderr_tail, code
    assert run_program(f"import glob\nassert glob.glob({str(project_dir / '*')!r}) == []").passed


def test_huge_output_is_capped():
    code = (
        "import sys\nfor _ in range(10**5):\n    sys.stderr.write('x' * 100)\nraise SystemExit(1)"
    )
    result = run_program(code, timeout_s=5, max_output_bytes=1000)
    assert not result.passed and len(result.stderr_tail) == 1000
    # a traceback after lots of output is still in the tail; stdout is discarded
    code = "print('y' * 10**7)\nimport sys\nsys.stderr.write('z' * 5000)\nassert False, 'the end'"
    result = run_program(code, max_output_bytes=1000)
    assert result.status == "failed" and result.stderr_tail.endswith("AssertionError: the end\n")


def test_run_many_keeps_order_and_runs_in_parallel():
    jobs = [
        (
            SOLUTION + "import time\ntime.sleep(0.5)\n",
            [f"assert add({i}) == {i + 1 if i % 2 else -1}"],
        )
        for i in range(8)
    ]
    start = time.monotonic()
    results = run_many(jobs, timeout_s=5, max_workers=8)
    assert [r.passed for r in results] == [i % 2 == 1 for i in range(8)]
    assert time.monotonic() - start < 3  # 8 x 0.5 s of sleeping would take 4 s one at a time


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_run_many_on_ray_tasks_matches_local(local_ray, monkeypatch):
    chunks, task = [], sandbox._run_chunk
    monkeypatch.setattr(sandbox, "_CHUNK", 3)  # 10 programs: 4 tasks, the last one short
    monkeypatch.setattr(sandbox, "_run_chunk", SimpleNamespace(
        remote=lambda chunk, *args: chunks.append(len(chunk)) or task.remote(chunk, *args)))
    jobs = [(SOLUTION, [f"assert add({i}) == {i + 1 if i % 3 else 0}"]) for i in range(9)]
    jobs.append(("while True:\n    pass\n", []))
    on_ray = run_many(jobs, timeout_s=1)
    assert chunks == [3, 3, 3, 1]
    assert on_ray == sandbox._run_local(jobs, timeout_s=1, workers=2)
    assert [r.status for r in on_ray] == ["failed", "passed", "passed"] * 3 + ["timeout"]
