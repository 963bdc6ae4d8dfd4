"""Run ``flower-supernode`` again while the SuperLink refuses to activate it, for a bounded time.

Flower 1.41's SuperLink refuses an authenticated SuperNode ("Failed to activate SuperNode.") while
the node id its key belongs to is still active: for about a minute after a SuperNode with that key
was killed without saying goodbye (SIGKILL, power cut), until the SuperLink has missed its
heartbeats. The refused ``flower-supernode`` exits. An operator restarting a crashed device would
have to try again by hand; :func:`run_retrying` does it: it runs the command, passes its output
through, and when the command exits after printing the refusal, starts it again after a pause, until
``retry_for`` seconds have passed since the first start. Any other exit ends it with the command's
code. SIGINT and SIGTERM are passed on to the command and end the retrying.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from fedmaml.deploy.supervisor import Outcome, run_once

#: What flower-supernode prints when the SuperLink refuses to activate it.
REFUSAL = "Failed to activate SuperNode"
#: Pause between attempts (seconds).
RETRY_PAUSE = 5.0


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _retryable(outcome: Outcome, retry_for: float) -> bool:
    """Whether to start the node again: only a node the SuperLink refused (a launcher that died
    is a fault of this machine, which another attempt would not mend)."""
    return outcome.refused and outcome.code != 0 and retry_for > 0 and not outcome.launcher_died


def run_retrying(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 retry_for: float = 120.0, pause: float = RETRY_PAUSE, refusal: str = REFUSAL,
                 say: Callable[[str], None] = _err,
                 beside: Sequence[str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> int:
    """Run ``argv`` until it exits without printing ``refusal``, or ``retry_for`` seconds have
    passed since the first start (0: never start it again); returns the exit code (1 when the
    bound was reached). ``beside``: a command started next to every attempt and stopped when it
    ends (the warm ClientApp launcher, which serves one SuperNode's Runtime API); if it exits
    first, the attempt is stopped and not retried (fedmaml/deploy/supervisor.py). An attempt that
    ends in a failure is reported through ``say``: what died, its exit status, its last lines.
    ``clock``: where the time bound reads the time (tests pass one that follows the attempts, not
    the machine's load)."""
    deadline = clock() + retry_for
    current: list[subprocess.Popen] = []
    stopping: list[int] = []

    def forward(signum, _frame) -> None:  # a stop request: pass it on, and do not retry
        stopping.append(signum)
        for proc in current:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        attempt = 0
        while True:
            attempt += 1
            outcome = run_once(argv, env=env, beside=beside, refusal=refusal, current=current,
                               stopping=stopping)
            if stopping:
                return outcome.code
            if not _retryable(outcome, retry_for):
                if outcome.report:
                    say(outcome.report)
                return outcome.code
            left = deadline - clock()
            if left <= 0:
                say(f"fedmaml: the SuperLink still refuses to activate this SuperNode after "
                    f"{retry_for:.0f}s ({attempt} attempts); giving up. Check that its key is "
                    "registered (`flwr supernode register`) and that no other SuperNode uses it, "
                    "or wait longer (--retry-for SECONDS)")
                return outcome.code or 1
            wait = min(pause, left)
            say(f"fedmaml: the SuperLink refused to activate this SuperNode (attempt {attempt}): "
                "it still counts a node with this key as active (Flower keeps a killed node active "
                "for about a minute), or the key is not registered; retrying in "
                f"{wait:.0f}s, for up to {left:.0f}s more (--retry-for)")
            stop_at = time.monotonic() + wait
            while time.monotonic() < stop_at and not stopping:
                time.sleep(min(0.1, wait))
            if stopping:
                return outcome.code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
