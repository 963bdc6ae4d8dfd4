"""The local simulation SuperLink that ``flwr run .`` uses, started so that it works offline.

With its default ``local`` connection, ``flwr run .`` starts a detached SuperLink in simulation mode
on 127.0.0.1 (port ``$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``, default 39091) unless one answers there
already; the one it starts installs the app's dependencies with ``uv`` for every run, which fails
offline (and the run fails while ``flwr run`` still exits 0). :func:`start_local_superlink` starts
the same SuperLink with ``--disable-runtime-dependency-installation`` first, so ``flwr run .``
finds it and the run uses the packages already installed. It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from fedmaml.deploy import processes
from fedmaml.deploy.commands import program
from fedmaml.deploy.crypto import DeployError
from fedmaml.deploy.flwr_config import flwr_home
from fedmaml.deploy.runs import flwr_env

PID_FILE = "fedmaml-superlink.pid"


def local_port() -> int:
    return int(os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091"))


def _state_dir() -> Path:
    return flwr_home() / "local-superlink"


def start_local_superlink(timeout: float = 30.0) -> tuple[int, Path]:
    """Start it (detached) and wait until it answers; returns (PID, log file)."""
    port = local_port()
    if processes.port_open("127.0.0.1", port):
        raise DeployError(f"something listens on 127.0.0.1:{port} already (a SuperLink that "
                          "`flwr run` started would install dependencies per run); stop it first: "
                          "`fedmaml deploy local-superlink --stop`, or by its PID")
    state = _state_dir()
    state.mkdir(parents=True, exist_ok=True)
    log = state / "superlink.log"
    argv = [program("flower-superlink"), "--insecure", "--simulation",
            "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
            "--database", str(state / "state.db")]
    env = flwr_env()
    # Its simulations start Ray in the runtime it spawns. Without an address, ray.init() joins the
    # last cluster started on this machine (`ray start`, Ray's cluster_utils) instead of a fresh
    # instance, and a run then lives and dies with that cluster; an address the user set is kept.
    if not env.get("RAY_ADDRESS"):
        env["RAY_ADDRESS"] = "local"
    proc = processes.start(argv, log, env=env)
    (state / PID_FILE).write_text(f"{proc.pid}\n")
    try:
        processes.wait_until(lambda: processes.port_open("127.0.0.1", port), timeout,
                             f"the local SuperLink on port {port}", process=proc,
                             name="the local SuperLink", log=log)
    except TimeoutError as e:
        raise DeployError(f"{e}; see {log}") from None
    except processes.ProcessExited as e:
        raise DeployError(str(e)) from None
    return proc.pid, log


def stop_local_superlink(timeout: float = 10.0) -> int | None:
    """Stop the SuperLink :func:`start_local_superlink` started (by the PID it recorded)."""
    pid_file = _state_dir() / PID_FILE
    if not pid_file.exists():
        return None
    pid = int(pid_file.read_text().strip() or 0)
    pid_file.unlink()
    # A PID from a file may have been reused since: signal it only if it is still a SuperLink.
    if not pid or not processes.alive(pid) or "flower-superlink" not in processes.command_of(pid):
        return None
    tree = processes.signal_tree(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(processes.alive(p) for p in tree):
        time.sleep(0.1)
    for p in tree:
        if processes.alive(p):
            os.kill(p, signal.SIGKILL)
    return pid
