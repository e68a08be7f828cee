"""One progress display for all long work: the stage, items done of the stage's total, items/s and an ETA.

A *stage* (:func:`stage`, opened by the journaled chunk loop for every scored set) owns the display; scoring
primitives inside it (:func:`progress_bar`) move the stage's count by their share of the current chunk, so the
count, the rate and the ETA move during packed scoring, not once per chunk. Outside a stage, a primitive shows its
own bar. On a terminal the display is a rich bar; otherwise a plain line every ``BIASLAB_PROGRESS_EVERY`` seconds
(30) and one when the stage ends. ``BIASLAB_PROGRESS=0`` or :func:`set_quiet` turns everything off.
"""
from __future__ import annotations

import contextvars
import os
import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_console = Console(stderr=True)
_quiet = False
_stage: contextvars.ContextVar["_Stage | None"] = contextvars.ContextVar("biaslab_stage", default=None)
_prefix: contextvars.ContextVar[str] = contextvars.ContextVar("biaslab_stage_prefix", default="")


def set_quiet(quiet: bool = True) -> None:
    """Turn every progress display off (``--quiet``)."""
    global _quiet
    _quiet = quiet


@contextmanager
def quieted():
    """Every progress display off inside the block (restored on exit)."""
    global _quiet
    was, _quiet = _quiet, True
    try:
        yield
    finally:
        _quiet = was


@contextmanager
def library_bars(flag: bool | None = None, label: str | None = None):
    """transformers' own bars ("Loading weights", "Writing model shards") inside the block only where biaslab's
    progress shows (``flag`` as in :func:`progress_enabled`): never under ``--quiet``, ``BIASLAB_PROGRESS=0`` or on
    ranks other than 0. Off a terminal (a log file, a Slurm job's output) their carriage-return updates would pile
    up on one line: there ``label`` gets two plain lines instead, when the block starts and when it ends. The
    previous state is restored on exit."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    shown = progress_enabled(flag)
    plain = shown and not _console.is_terminal
    if not shown or plain:
        hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    if plain and label:
        print(f"[biaslab] {label} …", file=sys.stderr, flush=True)
    try:
        yield
        if plain and label:
            print(f"[biaslab] {label}: done in {fmt_seconds(time.perf_counter() - t0)}", file=sys.stderr, flush=True)
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def progress_enabled(flag: bool | None = None) -> bool:
    if _quiet:
        return False
    if flag is not None:
        return flag
    return os.environ.get("BIASLAB_PROGRESS", "1") not in ("0", "false", "no")


def _every() -> float:
    try:
        return max(0.1, float(os.environ.get("BIASLAB_PROGRESS_EVERY", "30")))
    except ValueError:
        return 30.0


def fmt_seconds(s: float | None) -> str:
    if s is None or s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class _Rate(TextColumn):
    def __init__(self, unit: str):
        super().__init__("")
        self.unit = unit

    def render(self, task):  # items per second
        from rich.text import Text

        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"– {self.unit}/s", style="progress.data.speed")


def _columns(unit: str):
    return [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
            _Rate(unit), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]


class _Stage:
    """Counts (fractional) items of one stage and renders them as a bar or as plain periodic lines."""

    def __init__(self, label: str, total: int, unit: str, tty: bool):
        self.label, self.total, self.unit, self.tty = label, total, unit, tty
        self.done = 0.0          # whole chunks finished (or read back from a journal)
        self.chunk_n = 0         # items in the chunk being scored
        self.chunk_frac = 0.0    # share of it done, from the primitive's own count
        self.t0 = time.perf_counter()
        self.resumed = 0.0       # items read back, not scored: they do not count toward the rate
        self.last_line = self.t0
        self.prog = self.task = None

    # ---------------------------------------------------------------- counting
    def count(self) -> float:
        return min(self.total, self.done + self.chunk_n * self.chunk_frac)

    def rate(self) -> float | None:
        dt = time.perf_counter() - self.t0
        scored = self.count() - self.resumed
        return scored / dt if dt > 0.5 and scored > 0 else None

    def eta(self) -> float | None:
        r = self.rate()
        return (self.total - self.count()) / r if r else None

    def line(self, final: bool = False) -> str:
        n, r = self.count(), self.rate()
        rate = f"{r:,.1f} {self.unit}/s" if r else f"– {self.unit}/s"
        tail = f"done in {fmt_seconds(time.perf_counter() - self.t0)}" if final else f"eta {fmt_seconds(self.eta())}"
        return f"[biaslab] {self.label}: {n:,.0f}/{self.total:,} {self.unit} ({100 * n / max(1, self.total):.0f} %), {rate}, {tail}"

    def refresh(self, force: bool = False) -> None:
        if self.prog is not None:
            self.prog.update(self.task, completed=self.count())
        elif force or (time.perf_counter() - self.last_line >= _every() and self.count() < self.total):
            self.last_line = time.perf_counter()   # (at 100 % the stage's final line is about to say it)
            print(self.line(), file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- chunk protocol
    def start_chunk(self, n: int) -> None:
        self.chunk_n, self.chunk_frac = n, 0.0

    def chunk_share(self, frac: float) -> None:
        self.chunk_frac = max(self.chunk_frac, min(1.0, frac))   # several primitives per chunk: never backwards
        self.refresh()

    def add(self, n: int) -> None:
        """``n`` more items done outside the chunk protocol (a primitive's own display off a terminal)."""
        self.done += n
        self.refresh()

    def end_chunk(self, resumed: bool = False) -> None:
        self.done += self.chunk_n
        if resumed:
            self.resumed += self.chunk_n
        self.chunk_n, self.chunk_frac = 0, 0.0
        self.refresh()


def current_prefix() -> str:
    return _prefix.get()


@contextmanager
def stage_prefix(prefix: str):
    """Name the step a stage belongs to (``"3/6 after-audit"``); stages opened inside show ``prefix: key``."""
    tok = _prefix.set(prefix)
    try:
        yield
    finally:
        _prefix.reset(tok)


@contextmanager
def stage(key: str, total: int, *, unit: str = "items", enabled: bool | None = None):
    """One display for a stage of ``total`` items; yields the stage (or None when progress is off)."""
    if not progress_enabled(enabled) or total <= 0 or _stage.get() is not None:
        yield None     # off, empty, or nested in a stage that already owns the display
        return
    label = f"{_prefix.get()}: {key}" if _prefix.get() else key
    st = _Stage(label, total, unit, tty=_console.is_terminal)
    tok = _stage.set(st)
    try:
        if st.tty:
            with Progress(*_columns(unit), console=_console, transient=False) as prog:
                st.prog, st.task = prog, prog.add_task(label, total=total, info="")
                yield st
                prog.update(st.task, completed=total)
        else:
            yield st
            print(st.line(final=True), file=sys.stderr, flush=True)
    finally:
        _stage.reset(tok)


@contextmanager
def progress_bar(total: int, desc: str, *, unit: str = "items", enabled: bool | None = None):
    """Yields ``advance(n=1, **fields)``. Inside a stage it moves the stage's count by its share of the current
    chunk; otherwise it shows its own bar (a no-op when disabled or total is 0)."""
    st = _stage.get()
    if st is not None:
        done = [0]

        def share(n: int = 1, **fields):
            done[0] += n
            st.chunk_share(done[0] / max(1, total))

        yield share
        return
    if not progress_enabled(enabled) or total <= 0:
        yield lambda n=1, **kw: None
        return
    if not _console.is_terminal:   # a log, not a terminal: plain lines
        with stage(desc, total, unit=unit, enabled=enabled) as s:
            yield lambda n=1, **fields: s.add(n)
        return
    with Progress(*_columns(unit), console=_console, transient=False) as prog:
        task = prog.add_task(desc, total=total, info="")

        def advance(n: int = 1, **fields):
            info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            prog.update(task, advance=n, **({"info": info} if fields else {}))

        yield advance
