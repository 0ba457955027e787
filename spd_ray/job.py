"""A job's lifecycle, one for jobs/spd.py, jobs/compare.py and jobs/diagnose.py:

    with job.session(verbose) as j:
        cfg = j.check(load_config, path, overrides)      # a problem: `error: ...`, exit status 2
        ...                                               # every other check before any work
        j.open_log(run_dir / "logs" / "driver.log")       # the rest of the output goes there
        with j.ray(cfg.run, cfg):                         # Ray for the job's length, checked
            ...                                           # the work
    return j.status

Before any work, a problem of the input (the config, the data, the model, what the stages ask of
the cluster) is one `error:` line naming it and the fix, and exit status 2. Errors during the work
are not caught: they are the job's traceback in the driver log.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from spd_ray import console
from spd_ray.config import ConfigError, RunConfig, SPDConfig
from spd_ray.local_ray import ray_session
from spd_ray.stages.preflight import preflight

T = TypeVar("T")
# what the checks before any work raise for a problem of the input
PROBLEMS = (ConfigError, OSError, ValueError)


class Refused(Exception):
    """A problem found before any work; its message names the problem and the fix."""


class Job:
    """One job's state: its exit status (0, or 2 once refused)."""

    def __init__(self, verbose: bool):
        self.verbose, self.status = verbose, 0

    def check(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """`fn(*args, **kwargs)`, a check before any work: its problem ends the job (exit 2)."""
        try:
            return fn(*args, **kwargs)
        except PROBLEMS as err:
            raise Refused(str(err)) from err

    def open_log(self, path: Path) -> None:
        """The driver log at `path`: from here on the console shows only the job's own lines."""
        console.open_log(path)
        console.echo(f"  driver log {console.log_path()}" + ("" if self.verbose else " (all but these lines)"))

    @contextlib.contextmanager
    def ray(self, run: RunConfig, *cfgs: SPDConfig) -> Iterator[Path]:
        """Ray for the block (the cluster the job was submitted to, or a local one), after
        checking what every run of `cfgs` asks of it (`stages.preflight`); yields Ray's log folder."""
        with ray_session(run) as ray_logs:
            self.check(preflight, *cfgs)
            console.echo(f"  Ray logs {ray_logs}")
            yield ray_logs


@contextlib.contextmanager
def session(verbose: bool) -> Iterator[Job]:
    """A console session for the job (`spd_ray.console`); a `Refused` check ends the block with
    its `error:` line on the console and `status` 2."""
    job = Job(verbose)
    with console.session(verbose=verbose):
        try:
            yield job
        except Refused as err:
            console.error(f"error: {err}")
            job.status = 2
