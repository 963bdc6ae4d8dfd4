"""One start of a SuperNode, watched: ``flower-supernode`` and the ClientApp launcher beside it.

``fedmaml deploy supernode`` runs two processes that are no use without each other: Flower's
``flower-supernode`` (the node: it talks to the SuperLink and serves a Runtime API on its ``--port``)
and fedmaml's warm ClientApp launcher (fedmaml/deploy/warm_clientapps.py, which asks that Runtime API
for tasks). A node that dies leaves the launcher asking a dead (or, if the port was taken, someone
else's) Runtime API for ever; a launcher that dies leaves the node taking messages that no ClientApp
will run. :func:`run_once` therefore waits for the *first* of the two to exit, stops the other, and
returns an :class:`Outcome` whose ``report`` names what died, its exit status and its last lines of
output. The node's output is passed through line by line (and remembered: the last lines, and
whether the SuperLink refused the node, which fedmaml/deploy/retry.py acts on); the launcher writes
to this process's standard error directly.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedmaml.deploy.processes import (TAIL_LINES, describe_exit, exit_status, indented, last_lines,
                                      stop)

NODE = "flower-supernode"
LAUNCHER = "the ClientApp launcher"
#: How long the node's output may still flow after it exited (its pipe can be held open by a
#: process it started, e.g. Flower's own SuperExec with --cold-clientapps, until that one exits).
DRAIN_SECONDS = 5.0
#: Known causes, recognised in the dead node's output, and what to do about them.
HINTS = (
    ("address already in use", "another program (another SuperNode?) already listens on this "
     "node's --port: stop it, or give this node a free port with --port"),
    ("failed to activate supernode", "the SuperLink refused this node: its key is not registered "
     "(`flwr supernode register`), or a node with this key is still active (after a crash, for "
     "about a minute: --retry-for SECONDS starts it again meanwhile)"),
)


@dataclass(frozen=True)
class Outcome:
    """How one start ended. ``code``: the exit status for this command (a death by signal N is
    128 + N). ``refused``: the node printed the SuperLink's refusal. ``launcher_died``: the
    launcher exited first (the node was stopped). ``report``: the error to print, naming what died
    ("" when the node exited 0, or when a stop was requested)."""

    code: int
    refused: bool
    report: str
    launcher_died: bool = False


class _Output:
    """Passes a process's output on, line by line, keeping its last lines and whether ``watch``
    was in any of them."""

    def __init__(self, stream, watch: str) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=4 * TAIL_LINES)
        self.seen = False
        self._watch = watch.encode() if watch else None
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            sys.stderr.buffer.write(line)
            sys.stderr.flush()
            self.seen = self.seen or (self._watch is not None and self._watch in line)
            self.lines.append(line.decode(errors="replace"))

    def drain(self, timeout: float = DRAIN_SECONDS) -> None:
        self._thread.join(timeout)


def _start(argv: Sequence[str], env: Mapping[str, str] | None, piped: bool) -> subprocess.Popen:
    # In a session of its own: a Ctrl-C in the terminal reaches this process only, which passes it
    # on once (see fedmaml/deploy/retry.py).
    return subprocess.Popen(list(argv), stdout=subprocess.PIPE if piped else None,
                            stderr=subprocess.STDOUT if piped else None,
                            stdin=subprocess.DEVNULL, env=dict(env) if env is not None else None,
                            start_new_session=True)


def _first_exit(procs: Sequence[subprocess.Popen]) -> None:
    """Block until one of ``procs`` has exited (a waiting thread per process: no polling)."""
    done = threading.Event()
    for proc in procs:
        threading.Thread(target=lambda p=proc: (p.wait(), done.set()), daemon=True).start()
    while not done.wait(1.0):  # wakes up now and then only so that signals are handled
        pass


def _hints(lines: Sequence[str]) -> list[str]:
    text = "\n".join(lines).lower()
    return [hint for cause, hint in HINTS if cause in text]


def node_report(node: subprocess.Popen, lines: Sequence[str], seconds: float,
                launcher: subprocess.Popen | None) -> str:
    """The error for a node that exited on its own: who, how, when, what was stopped, its last
    lines, and a hint when the cause is a known one."""
    stopped = f"; stopped {LAUNCHER} (PID {launcher.pid})" if launcher is not None else ""
    tail = last_lines(lines)
    text = (f"fedmaml: {describe_exit(NODE, node.pid, node.returncode)} {seconds:.1f}s after it "
            f"started{stopped}. ")
    text += f"Its last lines of output:\n{indented(tail)}" if tail else "It printed nothing."
    return text + "".join(f"\nfedmaml: {hint}" for hint in _hints(lines))


def launcher_report(launcher: subprocess.Popen, seconds: float, node: subprocess.Popen) -> str:
    """The error for a launcher that exited while its node ran: the node cannot run ClientApps."""
    return (f"fedmaml: {describe_exit(LAUNCHER, launcher.pid, launcher.returncode)} "
            f"{seconds:.1f}s after it started: without it this SuperNode cannot run any ClientApp, "
            f"so {NODE} (PID {node.pid}) was stopped too. The launcher's output is above.")


def run_once(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
             beside: Sequence[str] | None = None, refusal: str = "",
             current: list[subprocess.Popen] | None = None,
             stopping: Sequence[object] = ()) -> Outcome:
    """Start the node ``argv`` and, if given, the launcher ``beside``; wait until one exits; stop
    the other. ``current`` is filled with the running processes (for a signal handler to pass a
    stop request on); a non-empty ``stopping`` means a stop was requested, so no report."""
    started = time.monotonic()
    node = _start(argv, env, piped=True)
    output = _Output(node.stdout, refusal)
    procs, launcher = [node], None
    try:
        if beside is not None:
            launcher = _start(beside, env, piped=False)
            procs.append(launcher)
        if current is not None:
            current[:] = procs
        if stopping:  # requested while they started, before a signal handler could reach them
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
        _first_exit(procs)
    finally:  # also on an exception (KeyboardInterrupt): nothing is left behind
        seconds = time.monotonic() - started
        node_died = node.poll() is not None
        stopped = [proc for proc in reversed(procs) if proc.poll() is None]
        for proc in stopped:
            stop(proc)
        output.drain()
    refused = output.seen
    if stopping:
        return Outcome(exit_status(node.returncode), refused, "")
    if node_died:
        code = exit_status(node.returncode)
        # the launcher is named as stopped only if it was (both may have died, e.g. an OOM kill)
        report = "" if code == 0 else node_report(node, list(output.lines), seconds,
                                                  launcher if launcher in stopped else None)
        return Outcome(code, refused, report)
    return Outcome(exit_status(launcher.returncode) or 1, refused,
                   launcher_report(launcher, seconds, node), launcher_died=True)
