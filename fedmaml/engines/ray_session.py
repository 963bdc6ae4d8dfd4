"""The Ray processes a run started: recorded while it runs, stopped when it ends, and cleaned by a
later run when the driver was killed (``kill -9``) before it could stop them.

A local Ray instance is a tree of processes (GCS, raylet, dashboard, log monitor, the
DashboardAgent and RuntimeEnvAgent, one worker per actor). ``ray.shutdown()`` stops them after a
normal end or Ctrl-C. After ``kill -9`` of the driver, the GCS and raylet die with it (Ray ties
them to the driver) and the workers follow the raylet, but the two agents, finding the raylet dead,
try to report it to the dead GCS and wait about 60 s for it before they exit (measured; Ray 2.55's
``process_watcher.report_raylet_error_logs``), longer than a user waits for ``ps`` to be clean.

So a run that starts a local instance writes a record, ``<state dir>/ray/<driver pid>-<start>.json``
(the state dir is ``$FEDMAML_STATE_DIR``, else ``$XDG_STATE_HOME/fedmaml``, else
``~/.local/state/fedmaml``): the driver's pid and start time, the Ray session directory, and the
pid and start time of every process of that session. Its normal end stops what is left of the
session and removes the record; the next run on the Ray engine (:func:`clean_leftovers`) stops
the processes of every record whose driver is dead, then removes that record.

Processes are never picked by name: other Ray clusters on the host (other users, other runs) are
untouched. A process belongs to a recorded session when its pid *and* start time are in the record
(a reused pid has another start time), or when its command line or one of its open files lies in
the recorded session directory (Ray's processes keep their logs open there; the directory's name
holds the start time and the pid of the driver that created it, so no other session shares it).
Linux only (``/proc``); elsewhere nothing is recorded and nothing cleaned.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fedmaml.atomic import atomic_write_text

log = logging.getLogger(__name__)

#: Environment variable naming fedmaml's state directory (records of running Ray sessions).
STATE_ENV = "FEDMAML_STATE_DIR"
#: Seconds a session's processes get to exit after ``ray.shutdown()`` before they are killed: the
#: actors, already told to stop, measured to take 3-9 s more on a loaded machine for nothing.
GRACE_SECONDS = 1.0
#: Seconds to wait for killed processes to be gone.
KILL_WAIT_SECONDS = 10.0
_PROC = Path("/proc")


def records_dir() -> Path:
    """Where the records of Ray sessions started by fedmaml live (one file per session)."""
    base = os.environ.get(STATE_ENV)
    if not base:
        xdg = os.environ.get("XDG_STATE_HOME")
        base = str(Path(xdg) / "fedmaml") if xdg else str(Path.home() / ".local" / "state" / "fedmaml")
    return Path(base) / "ray"


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), or
    ``None`` when there is no such process. Together with the pid it names one process for good."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: count after the last ")"
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        if fields[0] == "Z":  # a zombie has exited; only its parent's wait is missing
            return None
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return (_PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def _uses_dir(pid: int, directory: str) -> bool:
    """Whether the process's command line or one of its open files lies in ``directory``."""
    directory = directory.rstrip("/")
    prefix = directory + "/"
    for arg in _cmdline(pid).split(" "):
        value = arg.partition("=")[2] if "=" in arg else arg
        if value == directory or value.startswith(prefix):
            return True
    fd_dir = _PROC / str(pid) / "fd"
    try:
        fds = list(fd_dir.iterdir())
    except OSError:  # gone, or not ours to look at: then not ours to kill either
        return False
    for fd in fds:
        try:
            if os.readlink(fd).startswith(prefix):
                return True
        except OSError:
            continue
    return False


def _pids() -> list[int]:
    try:
        return [int(p.name) for p in _PROC.iterdir() if p.name.isdigit()]
    except OSError:
        return []


@dataclass
class SessionRecord:
    """One local Ray session a fedmaml driver started, and the file that records it."""

    session_dir: str
    driver_pid: int
    driver_start: int | None
    #: ``[pid, start time, command line (first 120 characters, for a reader)]``
    processes: list[list] = field(default_factory=list)
    path: Path | None = None

    # -- which processes are the session's -------------------------------------------------------
    def members(self) -> list[int]:
        """The live processes of this session (never the driver itself, nor this process)."""
        exclude = {os.getpid(), self.driver_pid}
        found = {pid for pid, start, *_ in self.processes
                 if pid not in exclude and start is not None and start_time(pid) == start}
        for pid in _pids():
            if pid not in exclude and pid not in found and _uses_dir(pid, self.session_dir) \
                    and start_time(pid) is not None:
                found.add(pid)
        return sorted(found)

    def driver_alive(self) -> bool:
        return self.driver_start is not None and start_time(self.driver_pid) == self.driver_start

    # -- the record file -------------------------------------------------------------------------
    def save(self) -> None:
        self.processes = [[pid, start_time(pid), _cmdline(pid)[:120]] for pid in self.members()]
        if self.path is None:
            self.path = records_dir() / f"{self.driver_pid}-{self.driver_start}.json"
        atomic_write_text(self.path, json.dumps({
            "session_dir": self.session_dir, "driver_pid": self.driver_pid,
            "driver_start": self.driver_start, "processes": self.processes}, indent=1))

    @classmethod
    def load(cls, path: Path) -> SessionRecord:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(session_dir=str(data["session_dir"]), driver_pid=int(data["driver_pid"]),
                   driver_start=data.get("driver_start"),
                   processes=[list(p) for p in data.get("processes", [])], path=path)

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    # -- stopping --------------------------------------------------------------------------------
    def stop(self, grace: float = GRACE_SECONDS) -> list[int]:
        """Wait up to ``grace`` seconds for the session's processes to exit, kill the rest, and
        remove the record once none is left; returns the pids still alive (then the record
        stays, for the next run to try again)."""
        left = _wait_gone(self.members, grace)
        if left:
            log.debug("Ray session %s: killing %s", self.session_dir, left)
            for pid in left:
                _kill(pid)
            left = _wait_gone(self.members, KILL_WAIT_SECONDS)
        if not left:
            self.remove()
        else:
            log.warning("Ray session %s: processes %s did not exit; the next Ray run retries "
                        "(record %s)", self.session_dir, left, self.path)
        return left


def record_session(session_dir: str) -> SessionRecord:
    """Record the local Ray session this process just started (call right after ``ray.init``)."""
    rec = SessionRecord(session_dir=session_dir, driver_pid=os.getpid(),
                        driver_start=start_time(os.getpid()))
    if _PROC.is_dir():
        rec.save()
    return rec


def clean_leftovers() -> list[int]:
    """Stop the processes of every recorded session whose driver is dead (killed before it could
    stop them) and remove those records; returns the pids that were killed. An unreadable record
    is logged and skipped."""
    if not _PROC.is_dir():
        return []
    killed: list[int] = []
    for path in sorted(records_dir().glob("*.json")):
        try:
            rec = SessionRecord.load(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the unreadable Ray session record %s: %s", path, e)
            continue
        if rec.driver_alive():
            continue  # a run still going (this user's other run): its session is its own
        members = rec.members()
        if members:
            log.info("stopping %d Ray processes left by a killed run (session %s)",
                     len(members), rec.session_dir)
        killed += members
        rec.stop(grace=0.0)
    return killed


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(members: Callable[[], Iterable[int]], seconds: float) -> list[int]:
    """Poll ``members()`` until it is empty or ``seconds`` have passed; return what is left."""
    deadline = time.monotonic() + seconds
    while True:
        left = list(members())
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)
