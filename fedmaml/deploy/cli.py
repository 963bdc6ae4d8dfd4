"""``fedmaml deploy ...``: the helpers of docs/deployment.md.

Each entry of :data:`SUBCOMMANDS` is ``(name, help, add_arguments, handler)``; ``fedmaml/cli.py``
turns them into its ``Command`` objects. Only the standard library is imported here: handlers import
the rest when they run. ``superlink`` prints the Flower command line and then *becomes* that
process (``exec``), so it keeps the PID, the terminal and the signals. ``supernode`` stays as the
parent of ``flower-supernode`` and of the ClientApp launcher beside it: it starts the node again
while the SuperLink refuses it (``--retry-for``, fedmaml/deploy/retry.py), passes SIGINT and SIGTERM
on, and when either process exits stops the other, says what died and exits non-zero
(fedmaml/deploy/supervisor.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedmaml.bundled import CONFIG_HELP, resolve_config


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _exec(argv: list[str], dry_run: bool, env: dict[str, str] | None = None) -> int:
    from fedmaml.deploy.commands import program_env, show

    if dry_run:
        print(show(argv))
        return 0
    _err(f"fedmaml: starting {show(argv)}")
    os.execve(argv[0], argv, program_env(env))
    return 0  # not reached


# -- certs / keys -----------------------------------------------------------------------------------
def _add_certs(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", metavar="DIR", help="new directory for ca.crt, ca.key, server.pem, "
                   "server.key (existing files are never overwritten)")
    p.add_argument("--host", action="append", default=[], metavar="HOST",
                   help="a name or IP address the SuperNodes use to reach the SuperLink "
                   "(repeatable; localhost and 127.0.0.1 are always included)")
    p.add_argument("--days", type=int, default=825, help="validity in days (default: 825)")


def _certs(a: argparse.Namespace) -> int:
    from fedmaml.deploy.crypto import LOCAL_HOSTS, certificate_hosts, make_certificates

    c = make_certificates(a.directory, a.host, days=a.days)
    print(f"created {c.ca} (give this file to every SuperNode and to `flwr`)")
    print(f"created {c.cert} and {c.key} (SuperLink only), signed by {c.directory / 'ca.key'}")
    print(f"the SuperLink certificate is valid for: {', '.join(certificate_hosts(c.cert))}")
    if not a.host:
        print(f"note: no --host given: SuperNodes can only connect from this machine "
              f"({', '.join(LOCAL_HOSTS)})")
    return 0


def _add_keys(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", metavar="DIR", help="directory for the key pairs")
    p.add_argument("names", nargs="+", metavar="NAME", help="one key pair per SuperNode, e.g. "
                   "node-0 node-1 (private key NAME, public key NAME.pub)")


def _keys(a: argparse.Namespace) -> int:
    from fedmaml.deploy.crypto import make_node_keys

    for pub in make_node_keys(a.directory, a.names):
        print(f"created {pub.with_suffix('')} (copy to its device only) and {pub}")
    print("register each public key with the running SuperLink:")
    for name in a.names:
        print(f"  flwr supernode register {Path(a.directory) / (name + '.pub')} <connection>")
    return 0


# -- superlink / supernode --------------------------------------------------------------------------
def _add_superlink(p: argparse.ArgumentParser) -> None:
    p.add_argument("--certs", metavar="DIR", help="directory made by `fedmaml deploy certs`")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS and no node authentication (local tests only; warned)")
    p.add_argument("--host", default="0.0.0.0", help="address where SuperNodes connect (the Fleet "
                   "API only; default: 0.0.0.0, all interfaces)")
    p.add_argument("--port", type=int, default=9092, help="port where SuperNodes connect "
                   "(default: 9092)")
    p.add_argument("--control-host", default="127.0.0.1", help="address of the Control API, where "
                   "`flwr` submits runs and registers node keys (default: 127.0.0.1, this machine "
                   "only: operators elsewhere use an SSH tunnel; anything else is warned about)")
    p.add_argument("--control-port", type=int, default=9093, help="port of the Control API "
                   "(default: 9093)")
    p.add_argument("--database", metavar="FILE", help="keep registered nodes and runs in this "
                   "SQLite file, across SuperLink restarts (default: in memory)")
    p.add_argument("--operator-token", metavar="FILE", help="the credential the Control API "
                   "requires (created, mode 0600, at the first start; default: operator.token in "
                   "the --certs directory, or in $FLWR_HOME with --insecure)")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")


def _token_file(a: argparse.Namespace) -> Path:
    from fedmaml.deploy.flwr_config import flwr_home
    from fedmaml.deploy.operator_token import TOKEN_FILE

    if a.operator_token:
        return Path(a.operator_token).expanduser().resolve()
    return (Path(a.certs).expanduser().resolve() if a.certs else flwr_home()) / TOKEN_FILE


def _superlink(a: argparse.Namespace) -> int:
    from fedmaml.deploy.commands import (CONTROL_WARNING, INSECURE_WARNING, LOOPBACK_HOSTS,
                                         superlink_argv)

    token = _token_file(a)
    argv = superlink_argv(a.certs, host=a.host, port=a.port, control_host=a.control_host,
                          control_port=a.control_port, database=a.database, insecure=a.insecure,
                          operator_token=token)
    if not a.dry_run:  # now, so that the operator can store it before the SuperLink is up
        from fedmaml.deploy.operator_token import ensure_token

        ensure_token(token)
        _err(f"fedmaml: the Control API requires the operator token in {token}; store it for flwr "
             f"with `fedmaml deploy connection NAME --address {a.control_host}:{a.control_port} "
             f"--token-file {token} ...`")
    if a.insecure:
        _err(INSECURE_WARNING)
    if a.control_host not in LOOPBACK_HOSTS:
        _err(CONTROL_WARNING.format(host=a.control_host, port=a.control_port))
    # The SuperLink's SuperExec looks for new runs every second by default (Flower's variable).
    env = {**os.environ, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL":
           os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")}
    return _exec(argv, a.dry_run, env)


def _add_supernode(p: argparse.ArgumentParser) -> None:
    p.add_argument("--superlink", required=True, metavar="HOST:PORT",
                   help="the SuperLink's fleet address, e.g. 192.168.1.10:9092")
    p.add_argument("--ca", metavar="FILE", help="the federation's ca.crt")
    p.add_argument("--key", metavar="FILE", help="this node's private key (registered)")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS and no node authentication (local tests only; warned)")
    p.add_argument("--partition-id", type=int, required=True, metavar="ID",
                   help="the client id this device serves")
    p.add_argument("--num-partitions", type=int, metavar="N", help="number of client ids in the "
                   "federation (informational)")
    p.add_argument("--memory-dir", metavar="DIR", help="keep the client's memories on this "
                   "device's disk (survives restarts); created if missing")
    p.add_argument("--memory-reset", action="store_true", help="replace a corrupt or mismatched "
                   "memory file by a fresh memory (the file is moved aside) instead of failing")
    p.add_argument("--data-path", metavar="PATH", help="this device's data (data.path for this "
                   "node)")
    p.add_argument("--port", type=int, default=9094, help="local port where the node's ClientApp "
                   "processes connect (distinct per node on one machine; default: 9094)")
    p.add_argument("--home", metavar="DIR", help="FLWR_HOME of this node (distinct per node on "
                   "one machine; default: $FLWR_HOME or ~/.flwr)")
    p.add_argument("--max-retries", type=int, metavar="N", help="stop after N failed connection "
                   "attempts (default: keep trying)")
    p.add_argument("--retry-for", type=float, default=120.0, metavar="SECONDS",
                   help="when the SuperLink refuses to activate the node (Flower refuses a key "
                   "whose node was killed, for about a minute), start it again every few seconds "
                   "for up to SECONDS, then exit non-zero (default: 120; 0: exit at once)")
    p.add_argument("--cold-clientapps", action="store_true", help="let Flower start every "
                   "ClientApp process from scratch (seconds per message) instead of forking it from "
                   "a process that has torch and Flower loaded")
    p.add_argument("--trusted-entities", metavar="YAML", help="run only apps signed by these keys "
                   "(Flower's app verification; see docs/deployment.md: in Flower 1.41 only apps "
                   "published on Flower Hub carry signatures, so this refuses `flwr run .`)")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")


def _supernode(a: argparse.Namespace) -> int:
    from fedmaml.deploy.commands import (INSECURE_WARNING, NodeSettings, prepare_memory_dir,
                                         supernode_argv)

    node = NodeSettings(a.partition_id, a.num_partitions, a.memory_dir, a.data_path, a.memory_reset)
    if not a.cold_clientapps and not hasattr(os, "fork"):  # e.g. Windows
        _err("fedmaml: this system cannot fork: every ClientApp process starts from scratch")
        a.cold_clientapps = True
    argv = supernode_argv(a.superlink, node, ca=a.ca, key=a.key, port=a.port, insecure=a.insecure,
                          max_retries=a.max_retries, warm=not a.cold_clientapps,
                          trusted_entities=a.trusted_entities)
    if a.insecure:
        _err(INSECURE_WARNING)
    env = None
    if a.home:
        home = Path(a.home).expanduser().resolve()
        home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "FLWR_HOME": str(home)}
    if not a.dry_run:
        prepare_memory_dir(node)
    if a.memory_dir is None and not a.dry_run:
        _err("fedmaml: no --memory-dir: memories live in this node's RAM and a restart loses them")
    warm = None
    if not a.cold_clientapps:
        from fedmaml.deploy.commands import warm_clientapps_argv

        warm = warm_clientapps_argv(a.port, os.getpid())
    from fedmaml.deploy.commands import program_env, show

    if a.dry_run:
        if warm is not None:
            print(show(warm) + " &")
        print(show(argv))
        return 0
    # This process stays as the parent of both: it restarts a refused node, passes SIGINT and
    # SIGTERM on, and when either process exits stops the other and says what died
    # (fedmaml/deploy/supervisor.py).
    from fedmaml.deploy.retry import run_retrying

    if warm is not None:  # a fresh one next to every attempt of the node
        _err(f"fedmaml: starting {show(warm)} next to the SuperNode")
    _err(f"fedmaml: starting {show(argv)}")
    return run_retrying(argv, env=program_env(env), retry_for=max(a.retry_for, 0.0), beside=warm)


# -- the flwr CLI side ------------------------------------------------------------------------------
def _add_connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="connection name, used as `flwr run . NAME`")
    p.add_argument("--address", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    p.add_argument("--ca", metavar="FILE", help="the federation's ca.crt (TLS)")
    p.add_argument("--insecure", action="store_true", help="no TLS (a --insecure SuperLink)")
    p.add_argument("--default", action="store_true", help="make it the default connection")
    p.add_argument("--token-file", metavar="FILE", help="the SuperLink's operator token (default: "
                   "operator.token next to --ca, if there is one)")
    p.add_argument("--home", metavar="DIR", help="FLWR_HOME to write to (default: $FLWR_HOME or "
                   "~/.flwr)")


def _connection(a: argparse.Namespace) -> int:
    from fedmaml.deploy.flwr_config import write_connection

    token = a.token_file
    if token is None and a.ca is not None:
        from fedmaml.deploy.operator_token import TOKEN_FILE

        beside = Path(a.ca).expanduser().resolve().parent / TOKEN_FILE
        token = beside if beside.is_file() else None
    path = write_connection(a.name, a.address, a.ca, insecure=a.insecure, default=a.default,
                            home=a.home, token_file=token)
    print(f"wrote connection {a.name!r} ({a.address}, "
          f"{'INSECURE' if a.insecure else 'TLS'}) to {path}")
    if token is not None:
        print(f"stored the operator token of {token} for it in {path.parent / 'credentials.yaml'}")
    else:
        _err("fedmaml: no operator token stored (no --token-file, none next to --ca): the "
             "SuperLink will refuse this connection's commands until you give it")
    return 0


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def _add_run_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help=CONFIG_HELP)
    _add_overrides(p)
    p.add_argument("-o", "--output", metavar="FILE", help="write here (default: print)")


def _resolved(config: str, overrides: list[str]):
    from fedmaml.config import load_config

    return load_config(resolve_config(config), overrides)


def _run_config(a: argparse.Namespace) -> int:
    from fedmaml.atomic import atomic_write_text
    from fedmaml.deploy.flwr_config import run_config_toml

    text = run_config_toml(_resolved(a.config, a.overrides))
    if a.output is None:
        print(text, end="")
    else:
        atomic_write_text(a.output, text)
        print(f"wrote {a.output}; submit with: flwr run . <connection> --run-config {a.output}")
    return 0


def _add_wait(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id", type=int, metavar="RUN_ID")
    p.add_argument("connection", nargs="?", metavar="CONNECTION",
                   help="SuperLink connection (default: the default one)")
    p.add_argument("--run-config", metavar="FILE", help="the run's run-config file: also print "
                   "where its run directory is and its summary")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after this long")


def _print_status(entry: dict) -> None:
    details = entry.get("status-details")
    print(f"run {entry.get('run-id')}: {entry.get('status')}"
          + (f" ({details})" if details and details != "N/A" else ""), flush=True)


def _wait(a: argparse.Namespace) -> int:
    from fedmaml.deploy.flwr_config import check_connection
    from fedmaml.deploy.runs import COMPLETED, wait_for_run

    check_connection(a.connection, "CONNECTION")
    entry = wait_for_run(a.run_id, a.connection, timeout=a.timeout, on_change=_print_status)
    if a.run_config:
        _show_run_dir(a.run_config, a.run_id)
    return 0 if entry.get("status") == COMPLETED else 1


def _show_run_dir(run_config: str, run_id: int) -> None:
    import tomllib

    from fedmaml.config import config_from_flat

    with open(run_config, "rb") as f:
        cfg = config_from_flat(tomllib.load(f), source=run_config)
    run_dir = Path(cfg.output_dir) / f"{cfg.name}-{run_id}"
    print(f"run directory: {run_dir}")
    if run_dir.is_dir():
        from fedmaml.experiment import format_summary

        print(format_summary([run_dir]))
    else:
        print("(not on this machine: it is on the SuperLink's)")


def _add_submit(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help=CONFIG_HELP)
    _add_overrides(p)
    p.add_argument("--connection", metavar="NAME", help="SuperLink connection (default: the "
                   "default one)")
    p.add_argument("--app", metavar="DIR", help="a Flower app directory with its pyproject.toml, "
                   "e.g. the fedmaml project (default: the fedmaml package this command runs, "
                   "bundled on the fly: works from any directory)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="stop waiting after this long")


def _submit(a: argparse.Namespace) -> int:
    from fedmaml.atomic import atomic_write_text
    from fedmaml.deploy.flwr_config import check_connection, run_config_toml
    from fedmaml.deploy.runs import COMPLETED, submit, wait_for_run

    cfg = _resolved(a.config, a.overrides)
    check_connection(a.connection, "--connection")  # before anything is written or bundled
    text = run_config_toml(cfg)
    out = Path(cfg.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_config = out / f"{cfg.name}.run-config.toml"
    atomic_write_text(run_config, text)
    if a.app is not None:
        run_id = submit(a.app, a.connection, run_config)
    else:
        from fedmaml.deploy.app_bundle import staged_app, user_code

        bundled = user_code(cfg)  # the user's own module files travel with the app
        for path in bundled:
            print(f"bundling {path} with the app", flush=True)
        with staged_app(bundled) as app:
            run_id = submit(app, a.connection, run_config)
    conn = f" {a.connection}" if a.connection else ""
    print(f"submitted run {run_id} (run config {run_config}); follow its log with: "
          f"flwr log {run_id}{conn}", flush=True)
    # Where the SuperLink runs on this machine, the run's summary.json appears here at its end.
    summary = out / f"{cfg.name}-{run_id}" / "summary.json"
    entry = wait_for_run(run_id, a.connection, timeout=a.timeout, on_change=_print_status,
                         sign=summary.exists)
    _show_run_dir(str(run_config), run_id)
    return 0 if entry.get("status") == COMPLETED else 1


# -- the Flower-native path -------------------------------------------------------------------------
def _add_local_superlink(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stop", action="store_true", help="stop the one this command started")


def _local_superlink(a: argparse.Namespace) -> int:
    from fedmaml.deploy.local import local_port, start_local_superlink, stop_local_superlink

    if a.stop:
        pid = stop_local_superlink()
        print(f"stopped the local SuperLink (PID {pid})" if pid else "no local SuperLink of ours "
              "is running")
        return 0
    pid, log = start_local_superlink()
    print(f"local simulation SuperLink on 127.0.0.1:{local_port()} (PID {pid}, log {log}), "
          "without runtime dependency installation; `flwr run .` will use it")
    return 0


def _add_app_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--update", metavar="PYPROJECT", help="rewrite the [tool.flwr.app.config] "
                   "section of this file instead of printing it")


def _app_config(a: argparse.Namespace) -> int:
    from fedmaml.deploy.flwr_config import app_config_toml, update_pyproject

    if a.update is None:
        print(app_config_toml(), end="")
    else:
        changed = update_pyproject(a.update)
        print(f"{'updated' if changed else 'unchanged:'} {a.update}")
    return 0


SUBCOMMANDS = (
    ("certs", "create a CA and the SuperLink's TLS certificate", _add_certs, _certs),
    ("keys", "create SuperNode authentication key pairs", _add_keys, _keys),
    ("superlink", "run a SuperLink with TLS, node authentication, offline app loading",
     _add_superlink, _superlink),
    ("supernode", "run a SuperNode for one client id, with its memory on disk",
     _add_supernode, _supernode),
    ("connection", "add a SuperLink connection to the flwr CLI's config.toml", _add_connection,
     _connection),
    ("run-config", "turn a fedmaml config into a run-config file for `flwr run`",
     _add_run_config, _run_config),
    ("submit", "submit a fedmaml config with `flwr run`, wait, print the run directory",
     _add_submit, _submit),
    ("wait", "wait for a run to finish; exit 0 only if it completed", _add_wait, _wait),
    ("local-superlink", "start (or --stop) an offline local SuperLink for `flwr run .`",
     _add_local_superlink, _local_superlink),
    ("app-config", "print (or --update) pyproject's [tool.flwr.app.config] from the schema",
     _add_app_config, _app_config),
)
