"""The Ray engine: Flower's simulation runtime with the Ray backend.

Each client message runs in a Ray actor with ``engine.num_cpus`` CPUs and ``engine.num_gpus`` GPUs
(fractional GPUs share a device). ``engine.ray_address`` connects to a running Ray cluster (start it
with ``ray start --head`` on one machine and ``ray start --address=HEAD:6379`` on the others), so the
actors spread over several machines.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp


def ray_backend_config(engine: Any) -> dict[str, Any]:
    init_args: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False}
    if engine.ray_address:
        init_args["address"] = engine.ray_address
    return {"client_resources": {"num_cpus": engine.num_cpus, "num_gpus": engine.num_gpus},
            "init_args": init_args}


def run_ray(server_app: ServerApp, client_app: ClientApp, num_nodes: int, engine: Any,
            verbose: bool = False) -> None:
    from flwr.simulation import run_simulation

    # Keep Ray from hiding GPUs from actors that ask for none (and from warning about it).
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_nodes,
                   backend_name="ray", backend_config=ray_backend_config(engine),
                   verbose_logging=verbose)
