"""Progress of long work (rounds of a run, runs of a sweep) that fits a terminal and a log alike.

* On an interactive terminal: one live line, redrawn in place about once a second, that fits the
  terminal's width (80 columns and narrower): the step, a bar when there is room, the caller's info
  (the last evaluation and its round, replies/failures), the elapsed time and the ETA. What does not
  fit is shortened (the bar first, then the info), never the step or the times.
* Anywhere else (a log file, a pipe, CI): a plain line every ``every`` steps or ``seconds`` seconds,
  whichever comes first, plus the first and the last; no carriage returns, no escape codes.

The ETA comes from measured steps only: the time per step since the first update (which carries the
warm-up: imports, engine start, the first evaluation), so it reads ``ETA --`` until a second update
has measured a step. Long phases inside a step (pattern selection, an evaluation, Ray's start) call
:func:`status`, which shows what is going on in the live line (and, in a log, a line when nothing was
written for ``seconds``). ``fedmaml run/sweep --progress-every N --progress-seconds T`` set the line
rhythm for the whole process (:func:`configure`); ``--quiet`` shows nothing.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass
class ProgressOptions:
    every: int = 0  # a line every this many steps; 0 = a tenth of the total
    seconds: float = 60.0  # and a line at least this often while steps complete


OPTIONS = ProgressOptions()
REDRAW_SECONDS = 1.0  # the live line's elapsed time and ETA move on while a step runs
MIN_DRAW_SECONDS = 0.1  # and steps of a few ms do not redraw it hundreds of times a second
#: Open progresses, innermost last: only that one draws, and :func:`status` goes to it (a quiet
#: one, such as a run inside a sweep, swallows the statuses of its run).
_ACTIVE: list["Progress"] = []
_LOCK = threading.RLock()


def configure(every: int | None = None, seconds: float | None = None) -> None:
    """Set the rhythm of plain progress lines for every later :class:`Progress`."""
    if every is not None:
        OPTIONS.every = every
    if seconds is not None:
        OPTIONS.seconds = seconds


def status(text: str, force: bool = False) -> None:
    """Say what the innermost open progress is doing now (until its next ``update``); nothing when
    it is quiet or there is none. ``force``: in a log, write the line now (the
    start of a long phase) rather than only when nothing was written for a while."""
    with _LOCK:
        if _ACTIVE:
            _ACTIVE[-1].set_status(text, force)


def is_interactive(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def terminal_width(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is both of the last
        return shutil.get_terminal_size().columns  # $COLUMNS, else 80


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def fit_line(head: str, info: str, times: str, width: int, fraction: float,
             unicode: bool = True) -> str:
    """``head [bar] info | times`` in at most ``width`` characters: the bar only when at least 10
    columns are left beside the info, the info shortened with an ellipsis; on a very narrow
    terminal the ETA alone stands for the times, and the line is cut at its end."""
    if len(head) + 1 + len(times) > width and " ETA " in times:
        times = times[times.index(" ETA ") + 1:]
    fixed = len(head) + 1 + len(times)
    room = width - fixed  # for " info |" and the bar
    line = f"{head} {times}"
    if info and room >= 6:
        cut = "…" if unicode else "~"
        shown = info if len(info) + 3 <= room else info[:room - 4] + cut
        room -= len(shown) + 3
        line = f"{head} {shown} | {times}"
    else:
        shown = ""
    if room >= 11:
        cells = min(room - 1, 30)
        filled = int(round(cells * min(max(fraction, 0.0), 1.0)))
        done, left = ("━", "╺") if unicode else ("#", "-")  # ╺: thin, the done part stands out
        bar = done * filled + left * (cells - filled)
        line = f"{head} {bar} {shown} | {times}" if shown else f"{head} {bar} {times}"
    return line[:width]


class Progress:
    """``update(done, info)`` after each step of ``total``; ``close()`` (or the ``with`` block's
    end) when stopping early. ``bar`` forces (True) or forbids (False) the live line; ``width``
    fixes its width (default: the terminal's); ``clock`` is the time source (tests).

    ``warmup_updates``: the ETA is measured from this update on (1: from the first). Work done by
    P parallel workers ends in a cluster of P updates, each worker's first step carrying its own
    start: measuring from the P-th update keeps that cluster out of the rate."""

    def __init__(self, total: int, label: str = "round", quiet: bool = False,
                 stream: TextIO | None = None, every: int | None = None,
                 seconds: float | None = None, bar: bool | None = None,
                 width: int | None = None, clock: Callable[[], float] = time.perf_counter,
                 warmup_updates: int = 1) -> None:
        self.total, self.label, self.quiet = total, label, quiet
        self.stream = stream or sys.stderr
        self.every = every or OPTIONS.every or max(1, total // 10)
        self.seconds = OPTIONS.seconds if seconds is None else seconds
        self.clock = clock
        self.start = clock()
        self.done, self.info, self.phase = 0, "", ""
        self._warmup, self._updates = max(1, warmup_updates), 0
        self._first: tuple[int, float] | None = None  # (done, time) of the warm-up's last update
        self._latest: tuple[int, float] | None = None  # and of the latest
        self._last_line: tuple[int, float] | None = None  # (done, time) of the last plain line
        self._width = width
        self._drawn = -1e300  # when the live line was last drawn
        self._live = not quiet and (is_interactive(self.stream) if bar is None else bar)
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._state = "new"  # -> "open" (registered, ticking) -> "closed"

    def _open(self) -> None:
        """Register as the innermost progress and start the live line's ticker: at the ``with``
        block's start or the first update, not at construction, so that a progress made early and
        never used (an error before its block) neither hides the outer line nor leaves a thread."""
        with _LOCK:
            if self._state != "new":
                return
            self._state = "open"
            _ACTIVE.append(self)
            if self._live:
                self._ticker = threading.Thread(target=self._tick, name="fedmaml-progress",
                                                daemon=True)
                self._ticker.start()

    # -- what is shown ----------------------------------------------------------------------------

    def eta(self, now: float) -> str:
        """Time left at the measured rate (steps since the warm-up's last update); ``--`` before
        a step is measured."""
        if self.done >= self.total:
            return "0s"
        first, latest = self._first, self._latest
        if first is None or latest is None or latest[0] <= first[0]:
            return "--"
        per_step = (latest[1] - first[1]) / (latest[0] - first[0])
        return _duration(max(0.0, per_step * (self.total - latest[0]) - (now - latest[1])))

    def _times(self, now: float) -> str:
        return f"{_duration(now - self.start)} ETA {self.eta(now)}"

    def _info(self) -> str:
        return " | ".join(p for p in (self.phase, self.info) if p)

    def render(self, now: float | None = None) -> str:
        """The live line as it would be drawn now."""
        now = self.clock() if now is None else now
        width = (self._width or terminal_width(self.stream)) - 1  # the last column would wrap
        unicode = "utf" in (getattr(self.stream, "encoding", None) or "utf-8").lower()
        return fit_line(f"{self.label} {self.done}/{self.total}", self._info(), self._times(now),
                        width, self.done / self.total if self.total else 1.0, unicode)

    def _plain_line(self, now: float) -> str:
        parts = [f"{self.label} {self.done}/{self.total}", self._info(),
                 f"{_duration(now - self.start)} elapsed", f"ETA {self.eta(now)}"]
        return " | ".join(p for p in parts if p)

    # -- updates ----------------------------------------------------------------------------------

    def update(self, done: int, info: str = "") -> None:
        self._open()
        if self._state == "closed":
            return
        if self.quiet:
            if done >= self.total:
                self.close()
            return
        now = self.clock()
        with _LOCK:
            self.done, self.info, self.phase = done, info, ""
            self._updates += 1
            if self._updates <= self._warmup:
                self._first = (done, now)
            self._latest = (done, now)
            if self._live:
                if done < self.total and now - self._drawn >= MIN_DRAW_SECONDS:  # else close draws
                    self._draw(now)
            else:
                last = self._last_line
                if (last is None or done >= self.total or done - last[0] >= self.every
                        or now - last[1] >= self.seconds):
                    self._write_plain(now)
        if done >= self.total:
            self.close()

    def set_status(self, text: str, force: bool = False) -> None:
        """What happens now inside the current step (see :func:`status`)."""
        if self.quiet or self._state != "open":
            return
        now = self.clock()
        with _LOCK:
            self.phase = text
            if self._live:
                self._draw(now)
            elif force or now - (self._last_line[1] if self._last_line else self.start) >= self.seconds:
                self._write_plain(now)

    def _write_plain(self, now: float) -> None:
        self._last_line = (self.done, now)
        self.stream.write(self._plain_line(now) + "\n")
        self.stream.flush()

    def _draw(self, now: float | None = None) -> None:
        if _ACTIVE and _ACTIVE[-1] is not self:
            return  # an inner progress (a run of a sweep) has the line
        now = self.clock() if now is None else now
        self._drawn = now
        self.stream.write("\r" + self.render(now) + "\x1b[K")
        self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(REDRAW_SECONDS):
            with _LOCK:
                if self._stop.is_set():
                    return
                try:
                    self._draw()
                except (OSError, ValueError):  # the terminal went away
                    return

    def close(self) -> None:
        """Stop the live line (leaving its last state on screen); plain lines need nothing."""
        with _LOCK:
            was_open, self._state = self._state == "open", "closed"
            if was_open and self._live and not self._stop.is_set():
                self._stop.set()
                try:
                    self._draw()  # the latest state (a throttled update may not be drawn yet)
                    self.stream.write("\n")
                    self.stream.flush()
                except (OSError, ValueError):
                    pass
            if self in _ACTIVE:
                _ACTIVE.remove(self)
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join()
            self._ticker = None

    def __enter__(self) -> Progress:
        self._open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
