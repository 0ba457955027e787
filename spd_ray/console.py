"""The console: what a person reads while a run goes, and the driver log that holds the rest.

A job opens a `session`: the console then shows a line as each stage starts and ends (`stage`),
one live progress bar at a time (`progress`), each warning once (`warn`, and the WARNING records
of the `spd_ray` loggers), and what the job prints with `log` and `echo`. Once `open_log` names
the driver log (runs/<name>/logs/driver.log), file descriptors 1 and 2 point at it, so everything
else the driver process prints lands there in full: Ray, Ray Data, Ray Train, DeepSpeed,
transformers and W&B output, Python warnings, tracebacks, and the workers' output that Ray
forwards to the driver (`sys.stdout` and `sys.stderr` are the log too, for writers that are not
on 1 and 2); the console writes to a copy of the original descriptor 1. `datasets`, which
prints from its first read of a file on (before the log is open), has its progress bars off and
its log records in the driver log for the session. `verbose` leaves 1 and 2 and `datasets` alone:
all of that stays on the console, as without a session, and the driver log gets the console's
own lines.

A progress bar is redrawn in place on a terminal; elsewhere (CI, `> file`, `ray job submit`) it
prints its state at most at 25, 50 and 75% (and only once it has run for a while), then its final
state once (unless it was over in a few seconds). Outside a session (tests, library use) lines and warnings go to `sys.stdout`, bars
are silent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import IO, TypeVar

# Off a terminal, a bar prints a milestone only once it has run this long, and its end only if it
# ran at least this long (the stage's end line says the rest).
MILESTONE_AFTER_S = 30.0
QUIET_UNDER_S = 5.0
_REDRAW_S = 0.1  # a terminal bar is redrawn at most this often
T = TypeVar("T")


class _Session:
    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.lock = threading.RLock()
        self.terminal: IO[str] | None = None  # a copy of the original stdout, once 1 and 2 are redirected
        self.log_file: IO[str] | None = None
        self.log_path: Path | None = None
        self.saved_fds: tuple[int, int] | None = None
        self.saved_streams: tuple[IO[str], IO[str]] = (sys.stdout, sys.stderr)
        self.early: list[str] = []  # lines written before the driver log was opened
        self.seen: set[str] = set()  # warnings shown
        self.bar: Progress | None = None  # the terminal bar now drawn, kept below new lines

    def out(self) -> IO[str]:
        return self.terminal or sys.stdout

    def tty(self) -> bool:
        """Whether bars are redrawn in place: on a terminal that nothing else writes to (verbose
        has everyone's output there)."""
        try:
            return not self.verbose and self.out().isatty()
        except (AttributeError, ValueError):
            return False

    def write(self, line: str, console: bool = True) -> None:
        """`line` into the driver log and, with `console`, onto the console (under a live bar)."""
        with self.lock:
            if self.log_file is not None:
                if self.saved_fds is not None:  # what the process printed so far, before this line
                    _flush(sys.stdout, sys.stderr)
                self.log_file.write(line + "\n")
            else:
                self.early.append(line)
            if console:
                out = self.out()
                if self.bar is not None:
                    out.write("\r\x1b[2K")
                out.write(line + "\n")
                if self.bar is not None:
                    out.write(self.bar.render())
                out.flush()

    def draw(self, bar: Progress) -> None:
        with self.lock:
            self.out().write("\r\x1b[2K" + bar.render())
            self.out().flush()

    def open_log(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            self.log_file = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
            self.log_path = path
            self.log_file.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: "
                                f"{' '.join(sys.argv)}\n")
            self.log_file.writelines(line + "\n" for line in self.early)
            self.early.clear()
            if self.verbose:
                return
            _flush(sys.stdout, sys.stderr)
            try:
                saved = (os.dup(1), os.dup(2))
            except OSError:  # no stdout to redirect (a closed descriptor): the console stays as it is
                return
            encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
            self.terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding=encoding, errors="replace")
            self.saved_fds, self.saved_streams = saved, (sys.stdout, sys.stderr)
            os.dup2(self.log_file.fileno(), 1)
            os.dup2(self.log_file.fileno(), 2)
            sys.stdout = sys.stderr = self.log_file  # for writers that are not on 1 and 2 (notebooks)

    def close(self) -> None:
        if self.bar is not None:  # outside the lock: its poller may be waiting for it
            self.bar.close()
        with self.lock:
            if self.saved_fds is not None:
                _flush(sys.stdout, sys.stderr)
                sys.stdout, sys.stderr = self.saved_streams
                for fd, saved in zip((1, 2), self.saved_fds):
                    os.dup2(saved, fd)
                    os.close(saved)
                self.saved_fds = None
            if self.terminal is not None:
                self.terminal.close()
                self.terminal = None
            if self.log_file is not None:
                self.log_file.close()
                self.log_file = None


def _flush(*streams) -> None:
    for stream in streams:
        with contextlib.suppress(Exception):
            stream.flush()


_active: _Session | None = None


class _ToDriverLog(logging.Handler):
    """A library's log records into the session's driver log (held until it opens), not the
    console."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if _active is not None:
                _active.write(self.format(record), console=False)
        except Exception:  # a log call must never break the run
            self.handleError(record)


@contextlib.contextmanager
def _datasets_to_log() -> Iterator[None]:
    """`datasets`' progress bars off (the console has its own) and its log records into the
    driver log, for the session; as they were after it."""
    from datasets import utils

    logger = utils.logging.get_logger()  # the library's root logger, with its stderr handler
    saved = (logger.handlers[:], logger.propagate, utils.are_progress_bars_disabled())
    logger.handlers, logger.propagate = [_ToDriverLog()], False
    utils.disable_progress_bars()
    try:
        yield
    finally:
        logger.handlers, logger.propagate = saved[0], saved[1]
        if not saved[2]:
            utils.enable_progress_bars()


class _WarningsOnce(logging.Handler):
    """The `spd_ray` loggers' warnings: each distinct message once on the console, all in the log."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            warn(record.getMessage())
        except Exception:  # a log call must never break the run
            self.handleError(record)


@contextlib.contextmanager
def session(verbose: bool = False) -> Iterator[None]:
    """The console of one job; a traceback that ends it is written to the driver log too."""
    global _active
    previous, _active = _active, _Session(verbose)
    handler = _WarningsOnce(level=logging.WARNING)
    logging.getLogger("spd_ray").addHandler(handler)
    try:
        with contextlib.nullcontext() if verbose else _datasets_to_log():
            yield
    except BaseException:
        if _active.log_file is not None:
            _active.write(traceback.format_exc().rstrip(), console=False)
        raise
    finally:
        logging.getLogger("spd_ray").removeHandler(handler)
        _active.close()
        _active = previous


def open_log(path: Path) -> None:
    """Send the session's detail to `path` (appended to); the console keeps only its own lines."""
    if _active is not None:
        _active.open_log(Path(path))


def log_path() -> Path | None:
    return None if _active is None else _active.log_path


def echo(line: str = "") -> None:
    """A line as it is (the results table, an indented detail of the stage under way)."""
    if _active is None:
        print(line, flush=True)
    else:
        _active.write(line)


def error(line: str) -> None:
    """A job's error line: on stderr until the driver log is open (the console's own stream
    after), and in the driver log."""
    if _active is None or _active.terminal is None:
        if _active is not None:
            _active.write(line, console=False)
        print(line, file=sys.stderr, flush=True)
    else:
        _active.write(line)


def log(msg: str) -> None:
    """A timestamped line."""
    echo(f"[{time.strftime('%H:%M:%S')}] {msg}")


def warn(msg: str) -> None:
    """A warning, shown once per session however often it is raised (each time in the log)."""
    if _active is None:
        print(f"warning: {msg}", flush=True)
        return
    with _active.lock:
        first = msg not in _active.seen
        _active.seen.add(msg)
        _active.write(f"warning: {msg}", console=first)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


@contextlib.contextmanager
def stage(name: str, detail: str = "") -> Iterator[SimpleNamespace]:
    """A line as the stage starts (`name: detail`) and one as it ends, with its duration and the
    key figures the body puts in `.summary`; or how it failed."""
    log(f"{name}: {detail}" if detail else name)
    figures = SimpleNamespace(summary="")
    start = time.monotonic()
    try:
        yield figures
    except BaseException as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else ""
        log(f"{name} failed after {duration(time.monotonic() - start)}: {type(err).__name__}"
            + (f": {why}" if why else ""))
        raise
    log(f"{name} done in {duration(time.monotonic() - start)}"
        + (f": {figures.summary}" if figures.summary else ""))


def _rate(per_s: float) -> str:
    return f"{per_s:.1f}/s" if per_s >= 0.1 else f"{per_s * 60:.1f}/min"


class Progress:
    """A bar of `done` of `total`: `update`/`set` it, or `poll` a reader; `close` prints its end."""

    def __init__(self, label: str, total: int, done: int = 0, unit: str = ""):
        self.label, self.total, self.done, self.unit = label, max(0, int(total)), int(done), unit
        self.session = _active if self.total > 0 else None  # silent outside a session
        self.start, self.start_done = time.monotonic(), self.done
        self.tty = self.session is not None and self.session.tty()
        self.last_draw, self.milestone = 0.0, 1  # next milestone: 1/4, 2/4, 3/4
        self.first: tuple[float, int] | None = None  # (time, done) of the first update that moved
        self.closed = False
        self.stopped = threading.Event()
        self.poller: threading.Thread | None = None
        if self.session is not None and self.tty:
            if self.session.bar is not None:  # one bar at a time
                self.session.bar.close()
            with self.session.lock:
                self.session.bar = self
                self.session.draw(self)

    def update(self, n: int = 1) -> None:
        self.set(self.done + n)

    def set(self, done: int) -> None:
        s = self.session
        if s is None or self.closed:
            self.done = done
            return
        with s.lock:
            now = time.monotonic()
            if self.first is None and done > self.done:  # the pace is measured from the first news
                self.first = (now, done)
            self.done = done
            if self.tty:
                if now - self.last_draw >= _REDRAW_S:
                    self.last_draw = now
                    s.draw(self)
                return
            if self.done >= self.total or self.done * 4 < self.milestone * self.total:
                return  # the end has its own line; one milestone line however many a jump passes
            self.milestone = self.done * 4 // self.total + 1
            if now - self.start >= MILESTONE_AFTER_S:
                s.write(self.render())

    def render(self) -> str:
        frac = min(1.0, self.done / self.total)
        elapsed = time.monotonic() - self.start
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        unit = f" {self.unit}" if self.unit else ""
        text = f"  {self.label} [{'#' * int(frac * 20):.<20}] {self.done}/{self.total}{unit}"
        if self.closed:
            return text + f" in {duration(elapsed)}" + (f" ({_rate(rate)})" if rate > 0 else "")
        text += f" {duration(elapsed)}"
        if self.first is not None and 0 < frac < 1 and self.done > self.first[1]:
            # the pace since the first news, which came after the start-up (loading models)
            pace = (self.done - self.first[1]) / max(1e-9, time.monotonic() - self.first[0])
            text += f", {duration((self.total - self.done) / pace)} to go"
        return text

    def count(self, items: Iterable[T], size: Callable[[T], int] = lambda item: 1) -> Iterator[T]:
        """`items` as they come, each counted (by `size`) once the consumer is done with it."""
        for item in items:
            yield item
            self.update(size(item))

    def poll(self, read: Callable[[], int | None], every_s: float = 2.0) -> Progress:
        """Set the bar from `read()` (None: no news) every `every_s` seconds, until closed."""
        def loop():
            while not self.stopped.wait(every_s):
                with contextlib.suppress(Exception):  # a reader that fails leaves the bar as it is
                    value = read()
                    if value is not None:
                        self.set(value)

        self.poller = threading.Thread(target=loop, name=f"progress-{self.label}", daemon=True)
        self.poller.start()
        return self

    def close(self) -> None:
        self.stopped.set()
        if self.poller is not None and self.poller is not threading.current_thread():
            self.poller.join(timeout=10)
        s = self.session
        if s is None or self.closed:
            self.closed = True
            return
        with s.lock:
            self.closed = True
            if s.bar is self:
                s.out().write("\r\x1b[2K")
                s.bar = None
            elif not self.tty and time.monotonic() - self.start < QUIET_UNDER_S:
                s.write(self.render(), console=False)  # off a terminal, a moment's bar is no news
                return
            s.write(self.render())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(label: str, total: int, done: int = 0, unit: str = "") -> Progress:
    return Progress(label, total, done, unit)
