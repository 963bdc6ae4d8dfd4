"""Starting and stopping the processes of a federation on one machine, always by PID.

A SuperLink or SuperNode starts helpers of its own (a SuperExec, a ServerApp or ClientApp process per
task), some in sessions of their own, so a process group does not cover them. :func:`stop` therefore
signals the process and every descendant it can see, by PID, and reaps what it started. Used by the
end-to-end test and by ``fedmaml deploy local-superlink``.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
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


class ProcessExited(RuntimeError):
    """A process that a wait depended on exited first: waiting longer cannot help."""


#: How many lines of a dead process's output an error quotes.
TAIL_LINES = 12
#: Bytes read from the end of a log for its last lines (a log can be large; its end is enough).
_TAIL_BYTES = 64 * 1024
_COLOUR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def last_lines(lines: Iterable[str], count: int = TAIL_LINES) -> list[str]:
    """The last ``count`` telling lines: no blank lines, no terminal colour codes (Flower colours
    its log levels), and of a Python traceback only its first and last lines (the frames would
    push the error that came before it out of view)."""
    kept: list[str] = []
    in_traceback = False
    for line in lines:
        line = _COLOUR.sub("", line).rstrip()
        if not line.strip() or (in_traceback and line[:1].isspace()):
            continue
        in_traceback = line.startswith("Traceback (most recent call last)")
        kept.append(line)
    return kept[-count:]


def log_tail(log: str | Path, count: int = TAIL_LINES) -> list[str]:
    """The last lines of the file ``log`` ([] if it cannot be read)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return last_lines(text.splitlines(), count)


def exit_status(returncode: int) -> int:
    """A :class:`subprocess.Popen` return code as a shell reports it: a death by signal N
    (``-N``) is ``128 + N``."""
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(name: str, pid: int, returncode: int) -> str:
    """``name (PID 12) exited with code 1``, or ``... was killed by SIGKILL``."""
    if returncode < 0:
        try:
            how = f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"was killed by signal {-returncode}"
    else:
        how = f"exited with code {returncode}"
    return f"{name} (PID {pid}) {how}"


def indented(lines: Iterable[str]) -> str:
    """Quoted lines, one per line, indented under the message that quotes them."""
    return "\n".join(f"    {line}" for line in lines)


def exited_error(process: subprocess.Popen, name: str | None = None,
                 log: str | Path | None = None) -> str:
    """What to say about ``process``, which has exited: who (``name``, default its command line,
    cut), its exit status and the last lines of ``log``."""
    command = " ".join(map(str, process.args)) if isinstance(process.args, (list, tuple)) else (
        str(process.args))
    text = describe_exit(name or command[:120], process.pid, process.returncode)
    if log is None:
        return text
    lines = log_tail(log)
    return text + (f"; the last lines of its log {log}:\n{indented(lines)}" if lines else
                   f"; its log {log} is empty")


def wait_until(condition: Callable[[], object], timeout: float, what: str,
               interval: float = 0.25, *, process: subprocess.Popen | None = None,
               name: str | None = None, log: str | Path | None = None) -> object:
    """Poll ``condition`` until it returns something truthy; TimeoutError naming ``what``.

    ``process``: the process that is to bring the condition about. If it exits first the wait
    ends at once with :class:`ProcessExited` naming it (``name``, default its command line), its
    exit status and the last lines of ``log``, instead of running out the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        # Polled before the condition: a process that met the condition and then exited passes.
        exited = process is not None and process.poll() is not None
        value = condition()
        if value:
            return value
        if exited:
            raise ProcessExited(f"{exited_error(process, name, log)}\n(while waiting for {what})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
