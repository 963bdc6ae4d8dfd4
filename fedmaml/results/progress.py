"""Progress of long work (rounds of a run, runs of a sweep) that fits a terminal and a log alike.

* On an interactive terminal: a live progress bar (rich, installed with Flower) with the step, the
  caller's info (loss, replies/failures), the elapsed time and the ETA, redrawn in place.
* Anywhere else (a log file, a pipe, CI): a plain line every ``every`` steps or ``seconds`` seconds,
  whichever comes first, plus the first and the last; no carriage returns, no escape codes.

The ETA is "-" until a step is done. ``fedmaml run/sweep --progress-every N --progress-seconds T``
set the line rhythm for the whole process (:func:`configure`); ``--quiet`` shows nothing.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass
class ProgressOptions:
    every: int = 0  # a line every this many steps; 0 = a tenth of the total
    seconds: float = 60.0  # and a line at least this often while steps complete


OPTIONS = ProgressOptions()


def configure(every: int | None = None, seconds: float | None = None) -> None:
    """Set the rhythm of plain progress lines for every later :class:`Progress`."""
    if every is not None:
        OPTIONS.every = every
    if seconds is not None:
        OPTIONS.seconds = seconds


def is_interactive(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


class Progress:
    """``update(done, info)`` after each step of ``total``; ``close()`` (or the ``with`` block's
    end) when stopping early. ``bar`` forces (True) or forbids (False) the live bar."""

    def __init__(self, total: int, label: str = "round", quiet: bool = False,
                 stream: TextIO | None = None, every: int | None = None,
                 seconds: float | None = None, bar: bool | None = None) -> None:
        self.total, self.label, self.quiet = total, label, quiet
        self.stream = stream or sys.stderr
        self.every = every or OPTIONS.every or max(1, total // 10)
        self.seconds = OPTIONS.seconds if seconds is None else seconds
        self.start = time.perf_counter()
        self._last: tuple[int, float] | None = None  # (done, time) of the last plain line
        self._bar: Any = None
        if not quiet and (is_interactive(self.stream) if bar is None else bar):
            self._bar, self._task = self._start_bar()

    def _start_bar(self) -> tuple[Any, Any]:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                   TextColumn, TimeElapsedColumn, TimeRemainingColumn)

        console = Console(file=self.stream, force_terminal=True)
        bar = RichProgress(TextColumn(self.label), MofNCompleteColumn(), BarColumn(),
                           TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                           TextColumn("ETA"), TimeRemainingColumn(), console=console,
                           redirect_stdout=False, redirect_stderr=False)
        bar.start()
        return bar, bar.add_task(self.label, total=self.total, info="")

    def update(self, done: int, info: str = "") -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=done, info=info)
            if done >= self.total:
                self.close()
            return
        now = time.perf_counter()
        last = self._last
        if (last is not None and done < self.total and done - last[0] < self.every
                and now - last[1] < self.seconds):
            return
        self._last = (done, now)
        elapsed = now - self.start
        eta = _duration(elapsed / done * (self.total - done)) if done else "-"
        parts = [f"{self.label} {done}/{self.total}", info, f"{_duration(elapsed)} elapsed",
                 f"ETA {eta}"]
        self.stream.write(" | ".join(p for p in parts if p) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Stop the live bar (leaving its last state on screen); plain lines need nothing."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
