import os
import time

from spd_ray.sandbox import run_many, run_program, run_tests

SOLUTION = "def add(x):\n    return x + 1\n"


def test_correct_passes_and_wrong_fails():
    assert run_tests(SOLUTION, ["assert add(1) == 2"]).status == "passed"
    wrong = run_tests(SOLUTION, ["assert add(1) == 3"])
    assert not wrong.passed and wrong.status == "failed" and "AssertionError" in wrong.stderr_tail
    assert run_program("def f(:\n").status == "error"


def test_infinite_loop_is_stopped():
    start = time.time()
    result = run_program("while True:\n    pass\n", timeout_s=1)
    assert result.status == "timeout" and time.time() - start < 4


def test_unbounded_allocation_fails():
    result = run_program("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", timeout_s=5, memory_mb=256)
    assert not result.passed and result.status in ("failed", "timeout")


def test_fork_subprocess_and_socket_are_blocked():
    for code in ("import os\nos.fork()", "import subprocess\nsubprocess.run(['echo', 'hi'])",
                 "import os\nos.system('echo hi')",
                 "import socket\nsocket.create_connection(('127.0.0.1', 9))",
                 "import socket\ns = socket.socket()"):
        assert not run_program(code).passed, code


def test_files_outside_stay_put(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("data")
    for code in (f"import os\nos.remove({str(victim)!r})", f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                 f"import pathlib\npathlib.Path({str(victim)!r}).unlink()"):
        assert not run_program(code).passed
    assert victim.read_text() == "data"
    # the program runs in an empty throwaway directory with an empty environment
    assert run_program("import os\nassert os.listdir('.') == ['.stderr'] and 'HOME' not in os.environ").passed
    assert os.path.exists("pyproject.toml")  # the tests run from the project root ...
    assert not run_program("open('pyproject.toml')").passed  # ... the program does not


def test_huge_output_is_capped():
    result = run_program("import sys\nfor _ in range(10**6):\n    sys.stderr.write('x' * 100)\nraise SystemExit(1)",
                         timeout_s=5, max_output_bytes=1000)
    assert not result.passed and len(result.stderr_tail) <= 1000


def test_run_many_keeps_order():
    jobs = [(SOLUTION, [f"assert add({i}) == {i + 1 if i % 2 else -1}"]) for i in range(6)]
    assert [r.passed for r in run_many(jobs, timeout_s=5)] == [i % 2 == 1 for i in range(6)]
