"""Placeholder until the full module lands."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass
class ExecResult:
    passed: bool
    status: str
    stderr_tail: str = ""


def run_program(code: str, timeout_s: float = 5.0) -> ExecResult:
    with tempfile.TemporaryDirectory() as d:
        try:
            r = subprocess.run([sys.executable, "-I", "-c", code], cwd=d, capture_output=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return ExecResult(False, "timeout")
    return ExecResult(r.returncode == 0, "passed" if r.returncode == 0 else "failed", r.stderr[-500:].decode())


def run_many(jobs, timeout_s: float = 5.0, max_workers=None):
    with ThreadPoolExecutor(max_workers or 4) as ex:
        return list(ex.map(lambda j: run_program(j[0] + "\n" + "\n".join(j[1]), timeout_s), jobs))
