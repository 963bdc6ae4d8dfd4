"""Submitting a run with ``flwr run`` and following it with ``flwr ls``.

``flwr run`` returns as soon as the SuperLink accepted the run, and exits 0 even if the ServerApp
fails later; the run's fate is its status in ``flwr ls --format json`` (``finished:completed``,
``finished:failed`` with ``status-details``, ``finished:stopped``). :func:`wait_for_run` polls it.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedmaml.deploy.commands import program, program_env
from fedmaml.deploy.crypto import DeployError

COMPLETED = "finished:completed"


def flwr_env(home: str | Path | None = None) -> dict[str, str]:
    """The environment of a ``flwr`` call: quiet, no update check, ``FLWR_HOME`` if given."""
    env = program_env()
    if home is not None:
        env["FLWR_HOME"] = str(Path(home).expanduser().resolve())
    return env


def flwr(args: Sequence[str], *, home: str | Path | None = None, cwd: str | Path | None = None,
         timeout: float = 120) -> dict[str, Any]:
    """Run ``flwr <args> --format json`` and return its JSON answer; DeployError on failure."""
    argv = [program("flwr"), *args, "--format", "json"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=flwr_env(home), cwd=cwd,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DeployError(f"`flwr {' '.join(args)}` did not answer within {timeout:.0f}s") from None
    answer = _json_in(done.stdout)
    if done.returncode != 0 or answer is None or not answer.get("success", False):
        detail = (answer or {}).get("error-message") or (done.stderr + done.stdout).strip()
        raise DeployError(f"`flwr {' '.join(args)}` failed: {detail[-2000:]}")
    return answer


def _json_in(text: str) -> dict[str, Any] | None:
    """The JSON object in ``flwr``'s output (which may print notices before it)."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        value = json.loads(text[start:])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def submit(app: str | Path, connection: str | None, run_config: str | Path, *,
           home: str | Path | None = None) -> int:
    """``flwr run <app> <connection> --run-config <file>``; returns the run id."""
    args = ["run", str(app)] + ([connection] if connection else []) + [
        "--run-config", str(Path(run_config).resolve())]
    return int(flwr(args, home=home)["run-id"])


def run_status(run_id: int, connection: str | None = None, *,
               home: str | Path | None = None) -> dict[str, Any]:
    """The run's entry of ``flwr ls`` (status, status-details, elapsed...)."""
    args = ["ls"] + ([connection] if connection else []) + ["--run-id", str(run_id)]
    runs = flwr(args, home=home).get("runs", [])
    if not runs:
        raise DeployError(f"run {run_id} is unknown to the SuperLink")
    return runs[0]


#: Longest wait between two polls of a run's status: each poll starts ``flwr ls`` (a Python
#: process, about half a second of CPU), so a long run is polled less and less often.
MAX_POLL_SECONDS = 15.0


def next_poll(wait: float, changed: bool, first: float) -> float:
    """The wait before the next poll: back to ``first`` when the status just changed, else half
    as long again as the last one, at most :data:`MAX_POLL_SECONDS`."""
    return first if changed else min(wait * 1.5, max(MAX_POLL_SECONDS, first))


#: How often a local sign of a run's end (see :func:`wait_for_run`) is checked: a file's existence.
SIGN_POLL_SECONDS = 0.2
#: How often the status is polled once that sign holds: the ServerApp exits seconds after it.
SIGNED_POLL_SECONDS = 1.0


def wait_for_run(run_id: int, connection: str | None = None, *, home: str | Path | None = None,
                 timeout: float | None = None, poll: float = 3.0,
                 on_change: Callable[[dict[str, Any]], None] | None = None,
                 sign: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Poll until the run is finished (any outcome) and return its final entry; every ``poll``
    seconds at first and after each change of status, less often while it stays the same.

    ``sign``: a cheap local sign that the run is ending, e.g. that its ``summary.json`` exists on
    this machine (the ServerApp writes it last). Checked every :data:`SIGN_POLL_SECONDS` between
    two status polls; once it holds, the status is polled :data:`SIGNED_POLL_SECONDS` later (or
    ``poll``, if shorter), and less often again from there, so that a long run's end is not
    noticed up to :data:`MAX_POLL_SECONDS` late."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last, wait, was_signed = None, poll, False
    while True:
        entry = run_status(run_id, connection, home=home)
        changed = entry.get("status") != last
        if changed:
            last = entry.get("status")
            if on_change is not None:
                on_change(entry)
        if str(entry.get("status", "")).startswith("finished"):
            return entry
        if deadline is not None and time.monotonic() > deadline:
            raise DeployError(f"run {run_id} is still {last!r} after {timeout:.0f}s")
        signed = sign is not None and sign()
        first = min(poll, SIGNED_POLL_SECONDS) if signed else poll
        # once signed, the back-off starts again from a short poll: the end is near, but a
        # ServerApp that lingers (a tracker's upload) is not polled every second for ever
        wait = first if signed and not was_signed else next_poll(wait, changed, first)
        was_signed = signed
        if deadline is not None:
            wait = max(min(wait, deadline - time.monotonic()), 0)
        _sleep(wait, None if signed else sign)


def _sleep(seconds: float, until: Callable[[], bool] | None) -> None:
    """Sleep ``seconds``, or less if ``until`` comes to hold meanwhile."""
    if until is None:
        time.sleep(seconds)
        return
    end = time.monotonic() + seconds
    while not until() and time.monotonic() < end:
        time.sleep(min(SIGN_POLL_SECONDS, max(end - time.monotonic(), 0)))
