"""A Flower 1.41 SuperLink whose Control API listens only where the operator is.

``flower-superlink`` 1.41 serves its three HTTP APIs on one socket (``--host``/``--port``): the
Fleet API (``/v1/fleet/...``, what SuperNodes call), the Control API (``/v1/control/...``, what
``flwr`` calls: submit runs, register node keys...) and the Runtime API (``/v1/runtime/...``, what
the ServerApp processes call). Open-source Flower authenticates neither ``flwr`` users (its OIDC
plugin ships only with Flower Enterprise) nor Runtime API clients in its default isolation mode, so
whoever reaches that socket controls the federation, and devices run the code submitted.

This module runs Flower's own SuperLink application (``flwr.superlink.main.create_app`` with
``flower-superlink``'s argument parsing and lifespan, unchanged) on two sockets:

* the **fleet socket** (``--fleet-host``/``--fleet-port``, e.g. ``0.0.0.0:9092``), for the devices,
  which answers the Fleet API only: any other path gets ``403``;
* the **control socket** (Flower's ``--host``/``--port``, ``127.0.0.1:9093`` by default), with every
  API: ``flwr`` and the ServerApp processes on this machine, remote operators through an SSH tunnel.

Usage (what ``fedmaml deploy superlink`` executes)::

    python -m fedmaml.deploy.superlink_server --fleet-host 0.0.0.0 --fleet-port 9092 \\
        <flower-superlink arguments, with --host/--port for the control socket>

It imports private parts of ``flwr.superlink.cli.flower_superlink`` (1.41); the project pins
``flwr<1.42``.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

FLEET_PREFIX = "/v1/fleet/"

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]


class FleetOnly:
    """ASGI wrapper: requests that arrive on ``fleet_port`` may only use the Fleet API."""

    def __init__(self, app: ASGIApp, fleet_port: int) -> None:
        self.app = app
        self.fleet_port = fleet_port

    async def __call__(self, scope: Scope, receive, send) -> None:
        server = scope.get("server") or (None, None)
        if (scope["type"] in ("http", "websocket") and server[1] == self.fleet_port
                and not scope.get("path", "").startswith(FLEET_PREFIX)):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            body = b"this port serves SuperNodes only (Fleet API); the Control API is elsewhere\n"
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        sys.exit(f"fedmaml: cannot listen on {host}:{port}: {e.strerror}")
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> None:
    ours = argparse.ArgumentParser(add_help=False)
    ours.add_argument("--fleet-host", required=True)
    ours.add_argument("--fleet-port", type=int, required=True)
    args, flower_args = ours.parse_known_args(sys.argv[1:] if argv is None else argv)

    import uvicorn
    from flwr.supercore import log
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    import importlib

    # The module, not the function of the same name that flwr.superlink.cli exports.
    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")
    from flwr.superlink.main import create_app

    # flower-superlink's own parsing, validation and certificate loading read sys.argv.
    sys.argv = ["flower-superlink", *flower_args]
    config = fs._parse_superlink_lifespan_config()  # noqa: SLF001 (pinned flwr 1.41)
    if (args.fleet_host, args.fleet_port) == (config.host, config.port):
        sys.exit("fedmaml: the fleet and control sockets must differ")
    app = FleetOnly(create_app(config, fs.SuperLinkLifespan), args.fleet_port)
    sockets = [_listen(args.fleet_host, args.fleet_port), _listen(config.host, config.port)]
    import logging

    log(logging.INFO, "Starting Flower SuperLink: Fleet API on %s:%s; Fleet, Control and Runtime "
        "APIs on %s:%s", args.fleet_host, args.fleet_port, config.host, config.port)
    server = uvicorn.Server(uvicorn.Config(
        app=app, reload=False, access_log=True, workers=1,
        log_config=get_uvicorn_log_config(console_handler.level),
        ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile))
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled; the shutdown is done
        pass


if __name__ == "__main__":
    main()
