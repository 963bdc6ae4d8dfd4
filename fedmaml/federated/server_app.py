"""The fedmaml ``ServerApp``: runs :class:`MetaStrategy` and records the run directory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmaml import collector
from fedmaml.federated import records as R
from fedmaml.federated.client_app import config_from_run_config
from fedmaml.federated.pattern_selection import selection_summary, write_selection
from fedmaml.federated.setup import setup_for
from fedmaml.federated.strategy import MetaStrategy
from fedmaml.results.plots import plot_run
from fedmaml.results.progress import Progress
from fedmaml.results.recorder import RunRecorder
from fedmaml.tracking import open_tracker

log = logging.getLogger("fedmaml")


def make_server_app(config: Any = None, run_dir: str | Path | None = None,
                    quiet: bool = False) -> ServerApp:
    """A ServerApp for ``config`` writing into ``run_dir``; with ``None`` both come from the run
    config (``flwr run``), the run directory being ``<output_dir>/<name>-<run id>``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config if config is not None else config_from_run_config(context.run_config)
        out = run_dir or Path(cfg.output_dir) / f"{cfg.name}-{context.run_id}"
        run_federated(grid, cfg, out, quiet=quiet)

    return app


def run_federated(grid: Grid, cfg: Any, run_dir: str | Path, quiet: bool = False) -> dict[str, Any]:
    """Run all rounds on ``grid``; write config, metrics.jsonl, summary.json, model.pt and
    convergence.png, and log them to the trackers of ``cfg.tracking`` (fedmaml/tracking/)."""
    setup = setup_for(cfg)
    strategy = MetaStrategy(setup)
    recorder = RunRecorder(run_dir, cfg)
    tracker = open_tracker(cfg, run_dir)
    progress = Progress(cfg.federated.rounds, quiet=quiet)
    key = "accuracy" if setup.classification else "loss"
    last_eval: dict[str, Any] = {}
    first_eval: dict[str, Any] = {}

    def on_round(row: dict[str, Any]) -> None:
        recorder.log_round(row)
        tracker.log_round(row)
        if "pattern_selection" in row:  # the table also gets a file of its own
            write_selection(run_dir, row["pattern_selection"])
        if "eval" in row:
            last_eval.clear()
            last_eval.update(row["eval"])
            if not first_eval:
                first_eval.update(row["eval"])
        shown = last_eval.get(f"seen.{key}.mean")
        info = f"{key} {shown:.4g}" if shown is not None else ""
        if "loss_after" in row:
            info = f"train loss {row['loss_after']:.4g} | eval {info}"
        if "replies" in row:
            info += f" | replies {row['replies']}/{len(row['clients'])}"
            info += f", {row['failures']} failed" if row["failures"] else ""
        progress.update(row["round"], info)

    timeout = cfg.federated.round_timeout or None
    # collections skip what existed before the run (fedmaml/collector.py); the tracker ends its
    # runs as failed or interrupted if the rounds raise; the progress bar stops either way
    with collector.frozen(), tracker, progress:
        result = strategy.start(grid, R.to_record(setup.initial_params), cfg.federated.rounds,
                                timeout=timeout, on_round=on_round)
    summary = {
        "name": cfg.name,
        "algorithm": cfg.algorithm.name,
        "rounds": cfg.federated.rounds,
        "metric": key,
        "eval_steps": cfg.evaluation.steps,
        "before": {k: v for k, v in first_eval.items() if not k.endswith(".clients")},
        "after": {k: v for k, v in last_eval.items() if not k.endswith(".clients")},
        "seconds": progress_elapsed(progress),
    }
    if strategy.selector.record is not None:
        summary["pattern_selection"] = selection_summary(strategy.selector.record)
    recorder.finish(summary, strategy.w)
    plot_run(run_dir)
    tracker.finish(summary, run_dir)
    del result
    return summary


def progress_elapsed(progress: Progress) -> float:
    import time

    return time.perf_counter() - progress.start


# The app that ``flwr run .`` loads (see [tool.flwr.app.components] in pyproject.toml).
app = make_server_app()
