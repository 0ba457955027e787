import time

import pytest

from spd_ray.sandbox import run_many, run_program, run_tests

SOLUTION = "def add(x):\n    return x + 1\n"


def test_correct_passes_and_wrong_fails():
    ok = run_tests(SOLUTION, ["assert add(1) == 2", "assert add(-1) == 0"])
    assert ok.passed and ok.status == "passed"
    wrong = run_tests(SOLUTION, ["assert add(1) == 3"])
    assert not wrong.passed and wrong.status == "failed" and "AssertionError" in wrong.stderr_tail
    assert run_tests("x = 1\n", ["assert add(1) == 2"], setup=SOLUTION).passed


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
        assert result.status == "timeout" and time.monotonic() - start < 3


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
        "import subprocess\nsubprocess.run(['echo', 'hi'])",
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
    ):
        assert not run_program(code).passed, code
    assert victim.read_text() == "data"
    # the program starts in an empty throwaway directory, may write there, and sees no inherited env
    code = "import os\nassert os.listdir('.') == [] and 'HOME' not in os.environ\n"
    code += "open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n"
    assert run_program(code).passed
    assert not run_program("open('pyproject.toml')").passed  # the tests' cwd is not the program's


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
