"""``run_experiment``: one config -> one run directory, on the engine the config names.

The same ClientApp and ServerApp run on every engine; only the transport changes.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from fedmaml.errors import ConfigError
from fedmaml.federated.client_app import make_client_app
from fedmaml.federated.server_app import make_server_app
from fedmaml.federated.setup import setup_for
from fedmaml.results.recorder import read_summary
from fedmaml.tracking import check_available


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
    """Run ``cfg`` (and the ``compare_with`` baselines under ``<run_dir>/baselines/``); return the run
    directory (config.yaml, metrics.jsonl, summary.json, model.pt, convergence.png)."""
    quiet_frameworks()
    run_dir = Path(run_dir) if run_dir else new_run_dir(cfg)
    run_one(cfg, run_dir, quiet)
    runs = [run_dir]
    for name in filter(None, (n.strip() for n in cfg.compare_with.split(","))):
        baseline = baseline_config(cfg, name)
        if not quiet:
            print(f"baseline {name}:", file=sys.stderr)
        run_one(baseline, run_dir / "baselines" / name, quiet)
        runs.append(run_dir / "baselines" / name)
    if not quiet:
        print(format_summary(runs), file=sys.stdout)
    return run_dir


def baseline_config(cfg: Any, algorithm: str) -> Any:
    """``cfg`` with another algorithm (first-order when its estimator does not apply)."""
    from fedmaml.config import replace_paths

    updates: dict[str, Any] = {"algorithm.name": algorithm, "compare_with": "",
                               "name": f"{cfg.name}-{algorithm}"}
    if algorithm in ("per_fedavg", "fedmeta") and cfg.algorithm.meta_gradient not in (
            ("first_order", "hessian_free") if algorithm == "per_fedavg" else ("first_order", "second_order")):
        updates["algorithm.meta_gradient"] = "first_order"
    return replace_paths(cfg, updates)


def run_one(cfg: Any, run_dir: Path, quiet: bool) -> None:
    """One config on the engine it names; the same ClientApp/ServerApp on every engine."""
    setup = setup_for(cfg)  # fail fast on bad data/model/pattern settings, before any engine starts
    check_available(cfg.tracking.backends)  # and on a tracking extra that is not installed
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
    elif engine == "vectorized":
        from fedmaml.engines.vectorized import run_vectorized

        run_vectorized(server_app, client_app, num_nodes, cfg).close()
    else:
        raise ConfigError(f"engine.name: {engine!r} is not available in this version; "
                          "use inprocess, ray or vectorized")


def format_summary(run_dirs: list[str | Path]) -> str:
    """A small table: personalized quality before and after training, per algorithm."""
    summaries = [(Path(d), read_summary(d)) for d in run_dirs]
    done = [(d, s) for d, s in summaries if s is not None]
    if not done:
        return "no finished run to summarize"
    key = done[0][1]["metric"]
    cols = (("seen", "", "trained, from w"), ("seen", "memory-", "trained, from memory"),
            ("unseen", "", "unseen, from w"))
    head = f"{'algorithm':<14}{'before training':>17}" + "".join(f"{c[2]:>22}" for c in cols)
    lines = [f"personalized {key} after {done[0][1].get('eval_steps', '')} adaptation steps "
             f"(mean over clients); run directory {run_dirs[0]}".replace("after  ", "after "),
             head, "-" * len(head)]
    for d, s in done:
        before = s["before"].get(f"seen.{key}.mean")
        row = f"{s['algorithm']:<14}{(f'{before:.4g}' if before is not None else '-'):>17}"
        for group, prefix, _ in cols:
            v = s["after"].get(f"{group}.{prefix}{key}.mean")
            row += f"{(f'{v:.4g}' if v is not None else '-'):>22}"
        lines.append(row + f"   ({s['seconds']:.0f}s)")
    return "\n".join(lines)
