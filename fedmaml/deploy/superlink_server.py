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
  With ``--operator-token-file FILE`` (what ``fedmaml deploy superlink`` passes), everything on it
  but the Fleet and Runtime APIs requires ``Authorization: Bearer <the token in FILE>``
  (fedmaml/deploy/operator_token.py): other local processes are refused (401) too.

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
#: Paths the control socket serves without the operator token: the Fleet API (what a SuperNode
#: may call anyway, on the fleet socket) and the Runtime API (the ServerApp processes, which Flower
#: starts and authenticates with per-task tokens; they cannot carry ours).
OPEN_PREFIXES = (FLEET_PREFIX, "/v1/runtime/")

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]


async def _refuse(scope: Scope, send, status: int, body: bytes) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    # No "WWW-Authenticate: Bearer" on a 401: the flwr CLI would try to refresh its token.
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class FleetOnly:
    """ASGI wrapper: requests that arrive on ``fleet_port`` may only use the Fleet API; with a
    ``token``, requests on the other socket need it, except for :data:`OPEN_PREFIXES`."""

    def __init__(self, app: ASGIApp, fleet_port: int, token: str | None = None) -> None:
        self.app = app
        self.fleet_port = fleet_port
        self.token = token

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        server = scope.get("server") or (None, None)
        path = scope.get("path", "")
        if server[1] == self.fleet_port:
            if not path.startswith(FLEET_PREFIX):
                await _refuse(scope, send, 403, b"this port serves SuperNodes only (Fleet API); "
                              b"the Control API is elsewhere\n")
                return
        elif self.token is not None and not path.startswith(OPEN_PREFIXES):
            from fedmaml.deploy.operator_token import authorized

            header = dict(scope.get("headers") or []).get(b"authorization")
            if not authorized(header, self.token):
                await _refuse(scope, send, 401, b"the Control API needs the operator token "
                              b"(Authorization: Bearer ...); store it for flwr with `fedmaml deploy "
                              b"connection NAME --address HOST:PORT --token-file operator.token`\n")
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
    ours.add_argument("--operator-token-file", metavar="FILE", help="require the token in FILE "
                      "(created, mode 0600, if missing) on the Control API")
    args, flower_args = ours.parse_known_args(sys.argv[1:] if argv is None else argv)
    token = None
    if args.operator_token_file is not None:
        from fedmaml.deploy.crypto import DeployError
        from fedmaml.deploy.operator_token import ensure_token

        try:
            token = ensure_token(args.operator_token_file)
        except DeployError as e:
            sys.exit(f"fedmaml: {e}")

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
    app = FleetOnly(create_app(config, fs.SuperLinkLifespan), args.fleet_port, token)
    sockets = [_listen(args.fleet_host, args.fleet_port), _listen(config.host, config.port)]
    import logging

    log(logging.INFO, "Starting Flower SuperLink: Fleet API on %s:%s; Fleet, Control and Runtime "
        "APIs on %s:%s (Control API: %s)", args.fleet_host, args.fleet_port, config.host,
        config.port, "operator token required" if token else "NO credential required")
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
