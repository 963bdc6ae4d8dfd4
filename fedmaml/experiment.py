"""``run_experiment``: one config -> one run directory, on the engine the config names.

The same ClientApp and ServerApp run on every engine; only the transport changes.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from fedmaml.errors import ConfigError, FedmamlError
from fedmaml.federated import checkpoint
from fedmaml.federated.client_app import make_client_app
from fedmaml.federated.health import run_status
from fedmaml.federated.server_app import make_server_app
from fedmaml.federated.setup import check_device, setup_for
from fedmaml.results.recorder import read_summary
from fedmaml.tracking import check_available


def quiet_frameworks() -> None:
    """Flower and Ray are chatty; fedmaml prints its own progress."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_LOG_LEVEL", "WARNING")
    logging.getLogger("flwr").setLevel(logging.WARNING)


def new_run_dir(cfg: Any) -> Path:
    """``<output_dir>/<name>``, or ``<name>-2``, ``-3``... if that exists already. When the last of
    them is an unfinished run of this very config, that is an error saying how to resume it
    (rather than silently starting over in the next directory)."""
    base = Path(cfg.output_dir) / cfg.name
    path, i, last = base, 1, None
    while path.exists() and any(path.iterdir()):
        last = path
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    if last is not None:
        refuse_unfinished(last, cfg)
    return path


def refuse_unfinished(run_dir: Path, cfg: Any) -> None:
    """A FedmamlError if ``run_dir`` is an unfinished run of ``cfg`` (same config up to
    output_dir): resume it or remove it, but do not leave it behind unnoticed."""
    from fedmaml.config import load_config
    from fedmaml.sweep import config_differences

    status = run_status(read_summary(run_dir))
    if status not in (None, "interrupted") or not (run_dir / "config.yaml").exists():
        return
    try:
        if config_differences(load_config(run_dir / "config.yaml"), cfg):
            return
    except FedmamlError:  # not a config this version reads: another experiment
        return
    if checkpoint.path_of(run_dir).exists():
        saved = checkpoint.load(run_dir)
        raise FedmamlError(f"{run_dir} is an unfinished run of this config (checkpoint after "
                           f"round {saved['round']} of {cfg.federated.rounds}); resume it with "
                           f"`fedmaml run --resume {run_dir}`, or move it away to start again")
    raise FedmamlError(f"{run_dir} is an unfinished run of this config without a checkpoint (it "
                       "crashed or was killed before its first one; see "
                       "federated.checkpoint_every); move it away (or delete it) to start again")


def run_experiment(cfg: Any, quiet: bool = False, run_dir: str | Path | None = None,
                   resume: bool = False) -> Path:
    """Run ``cfg`` (and the ``compare_with`` baselines under ``<run_dir>/baselines/``); return the run
    directory (config.yaml, metrics.jsonl, summary.json, model.pt, convergence.png).

    ``resume``: continue the runs of ``run_dir`` from their checkpoints; runs that already ended
    are kept, runs without a checkpoint start from the beginning. During a run the first SIGINT or
    SIGTERM stops it after the current round with a checkpoint (fedmaml/federated/checkpoint.py);
    the later runs (baselines) are then not started."""
    quiet_frameworks()
    if resume and run_dir is None:
        raise FedmamlError("resume needs the run directory")
    run_dir = Path(run_dir) if run_dir else new_run_dir(cfg)
    names = [n.strip() for n in cfg.compare_with.split(",") if n.strip()]
    runs = [(cfg, run_dir)] + [(baseline_config(cfg, n), run_dir / "baselines" / n) for n in names]
    with checkpoint.stop_on_signals():
        for i, (c, d) in enumerate(runs):
            if resume and run_status(read_summary(d)) not in (None, "interrupted"):
                continue  # ended before: its summary says how
            if i and not quiet:
                print(f"baseline {c.algorithm.name}:", file=sys.stderr)
            run_one(c, d, quiet, resume=resume and checkpoint.path_of(d).exists())
            if run_status(read_summary(d)) == "interrupted":
                break
    if not quiet:
        print(format_summary([d for _, d in runs]), file=sys.stdout)
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


def run_one(cfg: Any, run_dir: Path, quiet: bool, resume: bool = False) -> None:
    """One config on the engine it names; the same ClientApp/ServerApp on every engine."""
    setup = setup_for(cfg)  # fail fast on bad data/model/pattern settings, before any engine starts
    check_device(cfg.engine)  # and on a device the clients cannot have, the same on every engine
    check_available(cfg.tracking.backends)  # and on a tracking extra that is not installed
    num_nodes = setup.federation.num_clients + setup.federation.num_unseen
    server_app = make_server_app(cfg, run_dir, quiet=quiet, resume=resume)
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


def run_dirs_of(run_dir: str | Path, cfg: Any) -> list[Path]:
    """A run directory and the ``compare_with`` baselines inside it."""
    names = filter(None, (n.strip() for n in cfg.compare_with.split(",")))
    return [Path(run_dir), *(Path(run_dir) / "baselines" / n for n in names)]


def statuses(run_dirs: list[str | Path]) -> dict[Path, str]:
    """Each run directory's status (``summary.json``; ``unfinished`` without one)."""
    return {Path(d): run_status(read_summary(d)) or "unfinished" for d in run_dirs}


def format_summary(run_dirs: list[str | Path]) -> str:
    """A small table: personalized quality before and after training, per algorithm, and the
    status of every run that did not complete."""
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
    notes = []
    for d, s in done:
        before = s["before"].get(f"seen.{key}.mean")
        row = f"{s['algorithm']:<14}{(f'{before:.4g}' if before is not None else '-'):>17}"
        for group, prefix, _ in cols:
            v = s["after"].get(f"{group}.{prefix}{key}.mean")
            row += f"{(f'{v:.4g}' if v is not None else '-'):>22}"
        status = run_status(s)
        mark = "" if status == "completed" else f"  {status.upper()}"
        lines.append(row + f"   ({s['seconds']:.0f}s){mark}")
        if status != "completed":
            notes.append(f"{s['algorithm']} did not complete: {s.get('message', status)}")
        lost = {k: n for k, n in {**s.get("failures", {}),
                                  "rejected": s.get("rejected_updates", 0)}.items() if n}
        if status == "completed" and lost:  # it completed, but not every client took part
            notes.append(f"{s['algorithm']} completed with {sum(lost.values())} replies not used ("
                         + ", ".join(f"{k} {n}" for k, n in lost.items()) + f"; {s['replies']} "
                         "used)")
        if status == "completed" and s.get("memory_resets"):  # fresh memories replaced corrupt ones
            notes.append(f"{s['algorithm']} completed, {s['memory_resets']} client memories reset "
                         f"(clients {', '.join(map(str, s.get('memory_reset_clients', [])))}: their "
                         "memory files were corrupt and were moved aside; memory-reset=true)")
    return "\n".join(lines + notes)
