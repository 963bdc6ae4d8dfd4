"""``run_experiment``: one config -> one run directory, on the engine the config names.

The same ClientApp and ServerApp run on every engine; only the transport changes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

from fedmaml.errors import ConfigError
from fedmaml.federated.client_app import make_client_app
from fedmaml.federated.server_app import make_server_app
from fedmaml.federated.setup import setup_for
from fedmaml.results.plots import plot_run
from fedmaml.results.recorder import read_summary


def quiet_frameworks() -> None:
    """Flower and Ray are chatty; fedmaml prints its own progress."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_LOG_LEVEL", "WARNING")
    logging.getLogger("flwr").setLevel(logging.WARNING)


def new_run_dir(cfg: Any) -> Path:
    """``<output_dir>/<name>``, or ``<name>-2``, ``-3``... if that exists already."""
    base = Path(cfg.output_dir) / cfg.name
    path, i = base, 1
    while path.exists() and any(path.iterdir()):
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def run_experiment(cfg: Any, quiet: bool = False, run_dir: str | Path | None = None) -> Path:
    """Run ``cfg``; return its run directory (config.yaml, metrics.jsonl, summary.json, model.pt,
    convergence.png)."""
    quiet_frameworks()
    setup = setup_for(cfg)  # fail fast on bad data/model/pattern settings, before any engine starts
    run_dir = Path(run_dir) if run_dir else new_run_dir(cfg)
    num_nodes = setup.federation.num_clients + setup.federation.num_unseen
    server_app = make_server_app(cfg, run_dir, quiet=quiet)
    client_app = make_client_app(cfg)
    engine = cfg.engine.name
    if engine == "inprocess":
        from fedmaml.engines.inprocess import run_inprocess

        run_inprocess(server_app, client_app, num_nodes)
    elif engine == "ray":
        from fedmaml.engines.ray_engine import run_ray

        run_ray(server_app, client_app, num_nodes, cfg.engine)
    else:
        raise ConfigError(f"engine.name: {engine!r} is not available in this version; "
                          "use inprocess or ray")
    plot_run(run_dir)
    if not quiet:
        print(format_summary(run_dir), file=sys.stdout)
    return run_dir


def format_summary(run_dir: str | Path) -> str:
    """A small table: personalized quality before and after training, from w and from memory."""
    s = read_summary(run_dir)
    if s is None:
        return f"{run_dir}: no summary (the run did not finish)"
    key = s["metric"]
    lines = [f"run directory: {run_dir}", f"{s['algorithm']}, {s['rounds']} rounds, "
             f"{s['seconds']:.1f}s; personalized {key} after adaptation (mean over clients)",
             f"{'clients':<32}{'before training':>18}{'after training':>18}"]
    for group, prefix, label in (("seen", "", "trained clients, from w"),
                                 ("seen", "memory-", "trained clients, from memory"),
                                 ("unseen", "", "unseen clients, from w")):
        k = f"{group}.{prefix}{key}.mean"
        before, after = s["before"].get(k), s["after"].get(k)
        if after is not None:
            b = f"{before:.4g}" if before is not None else "-"
            lines.append(f"{label:<32}{b:>18}{after:>18.4g}")
    return "\n".join(lines)
