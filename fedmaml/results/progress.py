"""A small progress line for long runs: round, key metric, rate and ETA (no extra dependency)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, label: str = "round", quiet: bool = False,
                 stream: TextIO | None = None) -> None:
        self.total, self.label, self.quiet = total, label, quiet
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.tty = self.stream.isatty()
        self._last_print = 0.0

    def update(self, done: int, info: str = "") -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        # On a terminal redraw at most 10x/s; in logs print a line every ~10 % of the run.
        step = max(1, self.total // 10)
        if self.tty and now - self._last_print < 0.1 and done < self.total:
            return
        if not self.tty and done % step and done < self.total:
            return
        self._last_print = now
        elapsed = now - self.start
        eta = elapsed / done * (self.total - done) if done else float("nan")
        line = (f"{self.label} {done}/{self.total} | {info} | {elapsed:.0f}s elapsed, "
                f"ETA {eta:.0f}s")
        if self.tty:
            self.stream.write("\r" + line.ljust(100)[:150] + ("\n" if done >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
