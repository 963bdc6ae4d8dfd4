"""The fedmaml ``ServerApp``: runs :class:`MetaStrategy` and records the run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmaml import collector
from fedmaml.config.schema import Config
from fedmaml.federated import checkpoint
from fedmaml.federated import records as R
from fedmaml.federated.client_app import config_from_run_config
from fedmaml.federated.health import RunStopped
from fedmaml.federated.run_ledger import RunLedger
from fedmaml.federated.setup import setup_for, warn_pattern_steps
from fedmaml.federated.strategy import MetaStrategy
from fedmaml.results.metrics_row import MetricsRow
from fedmaml.results.progress import Progress
from fedmaml.results.run_files import resume_command


def make_server_app(config: Config | None = None, run_dir: str | Path | None = None,
                    quiet: bool = False, resume: bool = False) -> ServerApp:
    """A ServerApp for ``config`` writing into ``run_dir``; with ``None`` both come from the run
    config (``flwr run``), the run directory being ``<output_dir>/<name>-<run id>``. ``resume``:
    continue from the run directory's checkpoint (fedmaml/federated/checkpoint.py)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config if config is not None else config_from_run_config(context.run_config)
        out = run_dir or Path(cfg.output_dir) / f"{cfg.name}-{context.run_id}"
        run_federated(grid, cfg, out, quiet=quiet, resume=resume)

    return app


def run_federated(grid: Grid, cfg: Config, run_dir: str | Path, quiet: bool = False,
                  resume: bool = False) -> dict[str, Any]:
    """Run all rounds on ``grid``; write config, metrics.jsonl, summary.json, model.pt and
    convergence.png, and log them to the trackers of ``cfg.tracking`` (fedmaml/tracking/): the
    run's ledger (fedmaml/federated/run_ledger.py) keeps the books of what the strategy does.

    The summary carries the run's status (fedmaml/federated/health.py): a run that diverges or
    fails stops at once with one line saying the round, the cause and what to try, and its model.pt
    holds the last good model. Every ``federated.checkpoint_every`` rounds, and when a stop is
    requested (SIGINT/SIGTERM), the run directory gets a checkpoint; ``resume`` continues from it
    (fedmaml/federated/checkpoint.py)."""
    setup = setup_for(cfg)
    warn_pattern_steps(cfg)
    strategy = MetaStrategy(setup)
    ledger = RunLedger(cfg, run_dir, "accuracy" if setup.classification else "loss",
                       resume=resume)
    rounds = cfg.federated.rounds
    progress = Progress(rounds, quiet=quiet)

    def on_round(row: MetricsRow) -> None:
        r = row.round
        written = ledger.record([row], strategy.last_error)[-1]  # raises RunStopped
        stop = checkpoint.stop_requested()
        if ledger.checkpoint_due(r, stop):
            ledger.save_checkpoint(r, strategy.export_state(),
                                   lambda: strategy.checkpoint_memories(grid))
        if stop and r < rounds:
            raise RunStopped("interrupted", r, f"interrupted after round {r}; resume with "
                             f"{resume_command(run_dir, python=False)}")
        progress.update(r, ledger.progress_info(written))

    timeout = cfg.federated.round_timeout or None
    status, message, model = "completed", "", None
    try:
        # collections skip what existed before the run (collector.py); the progress bar stops
        # either way
        with collector.frozen(), progress:
            strategy.start(grid, R.to_record(setup.initial_params), rounds, timeout=timeout,
                           on_round=on_round, resume=ledger.resumed)
    except RunStopped as stop:  # diverged, failed or interrupted: the summary says which
        status, message = stop.status, stop.message
        model = strategy.w_before_update if stop.distrust_w else strategy.w
    except BaseException as e:
        ledger.abort(e)
        raise
    return ledger.finish(status, message, strategy.w if model is None else model,
                         strategy.summary_parts())


# The app that ``flwr run .`` loads (see [tool.flwr.app.components] in pyproject.toml).
app = make_server_app()
