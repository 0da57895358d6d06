"""Progress for long steps: a live display on a terminal, nothing at all otherwise.

    with progress_reporter() as say:          # enabled = sys.stderr.isatty()
        say("tracing")
        for batch in say.track(batches, "calibrating", total=len(batches)):
            ...

``say`` is a plain ``callable(str)``, so it can be passed as ``RunOptions.progress``.
Code deep in the pipeline that has no reporter in hand can call the module-level
:func:`track` / :func:`status`: they report to the innermost active reporter and are
silent (a bare pass-through) when there is none.

Modes
  * terminal (stderr is a TTY, or ``console`` is a terminal): a rich spinner for the
    current step, a bar for ``track`` loops; each finished step stays as one
    "✓ step  1.2s" line.
  * forced on a non-terminal (``enabled=True`` with stderr redirected, e.g. a CI log; the CLI
    does this unless ``--quiet``): one plain line per finished step with its duration,
    ``normc: tracing  3.2s``; a loop prints one line when it ends, never a line per item.
  * disabled (``enabled=False``, or None with stderr not a TTY): completely silent.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

__all__ = ["ProgressReporter", "progress_reporter", "status", "track"]

T = TypeVar("T")

_ACTIVE: contextvars.ContextVar["ProgressReporter | None"] = contextvars.ContextVar("normc_progress", default=None)


class ProgressReporter:
    """The object ``progress_reporter`` yields: call it with a status line; ``track`` loops."""

    enabled = False

    def __call__(self, message: str) -> None:  # pragma: no cover - overridden
        pass

    def track(self, iterable: Iterable[T], description: str = "working", total: int | None = None) -> Iterator[T]:
        yield from iterable

    def close(self) -> None:
        pass


class _Silent(ProgressReporter):
    def __call__(self, message: str) -> None:
        pass


def _total(iterable, total):
    if total is not None:
        return int(total)
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


class _Plain(ProgressReporter):
    """Line-oriented output for logs that are not terminals: one line per finished stage with its
    duration (``normc: tracing  3.2s``), one per finished loop, never one per item."""

    enabled = True

    def __init__(self, write: Callable[[str], None]):
        self._write = write
        self._step: tuple[str, float] | None = None

    def _finish_step(self) -> None:
        if self._step is not None:
            message, t0 = self._step
            self._write(f"normc: {message}  {time.perf_counter() - t0:.1f}s")
            self._step = None

    def __call__(self, message: str) -> None:
        self._finish_step()
        self._step = (message, time.perf_counter())

    def track(self, iterable, description="working", total=None):
        t0, n = time.perf_counter(), 0
        for n, item in enumerate(iterable, 1):
            yield item
        self._write(f"normc: {description}: {n} item(s)  {time.perf_counter() - t0:.1f}s")

    def close(self) -> None:
        self._finish_step()


class _Live(ProgressReporter):
    """rich live display: a spinner line for the current step, bars for loops."""

    enabled = True

    def __init__(self, console):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn)
        from rich.text import Text

        class LoopOnly:  # a column shown for `track` loops, blank for status lines (no total)
            def render(self, task):
                return Text("") if task.total is None else super().render(task)

        class Bar(LoopOnly, BarColumn):
            pass

        class Count(LoopOnly, MofNCompleteColumn):
            pass

        self.console = console
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), Bar(bar_width=30),
                                 Count(), TimeElapsedColumn(), console=console, transient=True)
        self.progress.start()
        self._step = None  # (task id, message, start time)

    def _finish_step(self) -> None:
        if self._step is not None:
            task, message, t0 = self._step
            self.progress.remove_task(task)
            self.console.print(f"[green]✓[/green] {message}  [dim]{time.perf_counter() - t0:.1f}s[/dim]",
                               highlight=False)
            self._step = None

    def __call__(self, message: str) -> None:
        self._finish_step()
        task = self.progress.add_task(message, total=None)
        self._step = (task, message, time.perf_counter())

    def track(self, iterable, description="working", total=None):
        total = _total(iterable, total)
        task = self.progress.add_task(description, total=total)
        try:
            for item in iterable:
                yield item
                self.progress.advance(task)
        finally:
            self.progress.remove_task(task)

    def close(self) -> None:
        self._finish_step()
        self.progress.stop()


@contextlib.contextmanager
def progress_reporter(enabled: bool | None = None, *, console=None) -> Iterator[ProgressReporter]:
    """Yield a progress reporter (``say(msg)``, ``say.track(it, description, total)``).

    ``enabled`` None: on when ``sys.stderr`` is a TTY. True: on even when it is not (plain
    lines). False: silent. ``console``: a rich Console to draw on (default: stderr).
    Nested reporters reuse the outer one (rich allows one live display at a time).
    """
    outer = _ACTIVE.get()
    if outer is not None and enabled is not False:
        yield outer
        return
    if enabled is None:
        enabled = _isatty(console)
    if not enabled:
        reporter: ProgressReporter = _Silent()
    elif _isatty(console):
        if console is None:
            from rich.console import Console
            console = Console(stderr=True, highlight=False)
        reporter = _Live(console)
    else:
        if console is not None:
            write = lambda line: console.print(line, markup=False, highlight=False)  # noqa: E731
        else:
            write = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
        reporter = _Plain(write)
    token = _ACTIVE.set(reporter)
    try:
        yield reporter
    finally:
        _ACTIVE.reset(token)
        reporter.close()


def _isatty(console) -> bool:
    if console is not None:
        return bool(console.is_terminal)
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def status(message: str) -> None:
    """Report a status line to the active reporter (silent when there is none)."""
    reporter = _ACTIVE.get()
    if reporter is not None:
        reporter(message)


def track(iterable: Iterable[T], description: str = "working", total: int | None = None) -> Iterator[T]:
    """Iterate ``iterable`` with a progress bar on the active reporter; a bare pass-through otherwise."""
    reporter = _ACTIVE.get()
    if reporter is None:
        return iter(iterable)
    return reporter.track(iterable, description, total)
