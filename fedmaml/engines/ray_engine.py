"""The Ray engine: Flower's simulation runtime with the Ray backend.

Each client message runs in a Ray actor with ``engine.num_cpus`` CPUs and ``engine.num_gpus`` GPUs
(fractional GPUs share a device). ``engine.ray_address`` connects to a running Ray cluster (start it
with ``ray start --head`` on one machine and ``ray start --address=HEAD:6379`` on the others), so the
actors spread over several machines; an address that does not answer is an error within
``CONNECT_SECONDS``. An empty address starts a fresh local Ray instance, never a stale one.

A local instance is fedmaml's to clean up: it is recorded while the run goes, stopped with the run
(normal end, Ctrl-C, an error), and what a driver killed with ``kill -9`` left behind is stopped by
the next run on this engine (fedmaml/engines/ray_session.py).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedmaml.engines import ray_session
from fedmaml.errors import ConfigError


#: Seconds to wait for a given Ray cluster's address to accept a connection.
CONNECT_SECONDS = 10.0
#: ``ray.init`` arguments that keep Ray's and its workers' logs off the run's console.
QUIET = {"logging_level": "ERROR", "log_to_driver": False}


def ray_backend_config(engine: Any) -> dict[str, Any]:
    # An empty address means a fresh local instance ("local"): Ray's default (None) would instead
    # join the cluster recorded by the last `ray start` on this machine, and hang for good
    # printing GCS warnings when that cluster has died since.
    init_args: dict[str, Any] = {**QUIET, "address": engine.ray_address or "local"}
    return {"client_resources": {"num_cpus": engine.num_cpus, "num_gpus": engine.num_gpus},
            "init_args": init_args}


def _drop_run_simulation_deprecation(record: logging.LogRecord) -> bool:
    """Flower 1.41 logs a deprecation notice for ``run_simulation`` on every call. It is the
    supported way to run a simulation from Python (``flwr run`` needs a SuperLink), so the notice is
    noise for fedmaml users; every other Flower warning still shows (a logging filter)."""
    message = record.getMessage()
    return not ("DEPRECATED FEATURE" in message and "run_simulation" in message)


def check_reachable(address: str, seconds: float = CONNECT_SECONDS) -> None:
    """A ConfigError, within ``seconds``, when ``engine.ray_address`` (``host:port`` or
    ``ray://host:port``) does not accept a TCP connection: Ray itself would retry for minutes."""
    if not address or address in ("local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=seconds).close()
    except ValueError:
        raise ConfigError(f"engine.ray_address: {address!r} is not host:port (e.g. "
                          "192.168.1.10:6379, or ray://host:10001); leave it empty to start a "
                          "local Ray instance") from None
    except OSError as e:
        raise ConfigError(f"engine.ray_address: cannot reach {address} within {seconds:.0f}s "
                          f"({e}); start the cluster there (`ray start --head`), or leave ray_address "
                          "empty to start a local Ray instance") from None


def run_ray(server_app: ServerApp, client_app: ClientApp, num_nodes: int, engine: Any,
            verbose: bool = False) -> None:
    from flwr.simulation import run_simulation

    flwr_log = logging.getLogger("flwr")
    if not verbose:
        flwr_log.setLevel(logging.WARNING)
    flwr_log.addFilter(_drop_run_simulation_deprecation)  # idempotent: the same function
    backend_config = ray_backend_config(engine)
    session = None
    try:
        session = connect(engine, join=False)  # a cluster: Flower joins it
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_nodes,
                       backend_name="ray", backend_config=backend_config,
                       verbose_logging=verbose)
    finally:
        # Flower shuts Ray down when the simulation ends normally; make sure an interrupted or
        # failed run does not leave raylet and workers behind either.
        stop_ray(session)


def connect(engine: Any, join: bool = True, **local: Any) -> ray_session.SessionRecord | None:
    """Ray for a run on ``engine``: with an empty (or ``local``) ``engine.ray_address`` a fresh
    local instance (``ray.init`` arguments ``local`` and Flower's: no dashboard, the workers get
    this process's import path), started here rather than in Flower (which then keeps it) so that
    its session is recorded, after what a killed run's Ray left is stopped, and returned for
    :func:`stop_ray`; else the cluster there, checked to answer, and joined when ``join``."""
    import ray

    check_reachable(engine.ray_address)
    # Keep Ray from hiding GPUs from actors that ask for none (and from warning about it).
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if engine.ray_address in ("", "local"):
        ray_session.clean_leftovers()
        context = ray.init(runtime_env=worker_runtime_env(),
                           **{"include_dashboard": False, **QUIET, "address": "local", **local})
        return ray_session.record_session(context.address_info["session_dir"])
    if join:
        ray.init(address=engine.ray_address, runtime_env=worker_runtime_env(), **QUIET)
    return None


def stop_ray(session: ray_session.SessionRecord | None) -> None:
    """Shut Ray down if it is running, then stop the processes of the local instance ``session``
    (``None``: a cluster's, not ours), which ``ray.shutdown()`` does not wait for."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if session is not None:
        session.stop()


def worker_runtime_env() -> dict[str, Any]:
    """Ray workers import what this process imports: its import path (e.g. a user's model module
    on PYTHONPATH) travels with the job."""
    paths = [*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}
