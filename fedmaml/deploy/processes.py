"""Starting and stopping the processes of a federation on one machine, always by PID.

A SuperLink or SuperNode starts helpers of its own (a SuperExec, a ServerApp or ClientApp process per
task), some in sessions of their own, so a process group does not cover them. :func:`stop` therefore
signals the process and every descendant it can see, by PID, and reaps what it started. Used by the
end-to-end test and by ``fedmaml deploy local-superlink``.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


#: The first port :func:`free_port` considers (below it: the well-known and registered services).
FIRST_FREE_PORT = 20000


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now, below the range from which the OS gives the local
    ports of outgoing connections: a port the OS picked from that range could be taken by some
    client's connection before the server meant for it binds it (a SuperNode then fails to start
    with "address already in use")."""
    lowest = _ephemeral_ports()[0]
    rng = random.SystemRandom()
    for _ in range(100 if lowest > FIRST_FREE_PORT else 0):
        port = rng.randrange(FIRST_FREE_PORT, lowest)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:  # in use: another
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # none found: the OS's pick
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ephemeral_ports() -> tuple[int, int]:
    """The OS's range of local ports for outgoing connections (Linux's, where it says; else the
    lowest default among systems: Linux's 32768, where macOS and Windows start at 49152)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 65535


def start(argv: Sequence[str], log: str | Path, *, env: Mapping[str, str] | None = None,
          cwd: str | Path | None = None) -> subprocess.Popen:
    """Start ``argv`` in a session of its own (a Ctrl-C in the terminal does not reach it), with
    stdout and stderr appended to ``log``."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=dict(env) if env is not None else None,
                                cwd=cwd, start_new_session=True)


def descendants(pid: int) -> list[int]:
    """PIDs of the children of ``pid``, their children, and so on (from ``ps``)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            children.setdefault(int(parts[1]), []).append(int(parts[0]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) still answers signal 0; /proc tells, where there is one.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def command_of(pid: int) -> str:
    """The command line of a running process ("" if there is none)."""
    try:
        # -ww: never cut the line to the terminal width ($COLUMNS applies even without a terminal)
        return subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True,
                              text=True, check=False).stdout.strip()
    except OSError:
        return ""


def signal_tree(pid: int, sig: int) -> list[int]:
    """Send ``sig`` to ``pid`` and all its descendants (found before the first signal, so children
    re-parented on their parent's death are still reached); returns the PIDs signalled."""
    tree = [pid, *descendants(pid)]
    for p in tree:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass
    return tree


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM ``proc`` and its descendants, wait up to ``timeout``, then SIGKILL what is left."""
    if proc.poll() is None:
        tree = signal_tree(proc.pid, signal.SIGTERM)
    else:
        tree = [proc.pid, *descendants(proc.pid)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in tree if p != proc.pid):
        time.sleep(0.1)
        proc.poll()
    try:
        proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    for p in tree:
        if alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def wait_until(condition: Callable[[], object], timeout: float, what: str,
               interval: float = 0.25) -> object:
    """Poll ``condition`` until it returns something truthy; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
