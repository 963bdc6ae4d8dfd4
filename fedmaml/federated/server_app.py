"""The fedmaml ``ServerApp``: runs :class:`MetaStrategy` and records the run directory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmaml import collector
from fedmaml.config.schema import Config
from fedmaml.errors import FedmamlError
from fedmaml.federated import checkpoint, faults
from fedmaml.federated import records as R
from fedmaml.federated.client_app import config_from_run_config
from fedmaml.federated.health import RunHealth, RunStopped
from fedmaml.federated.pattern_selection import selection_summary, write_selection
from fedmaml.federated.setup import setup_for
from fedmaml.federated.strategy import MetaStrategy
from fedmaml.provenance import run_provenance
from fedmaml.results.plots import plot_run
from fedmaml.results.progress import Progress
from fedmaml.results.recorder import RunRecorder
from fedmaml.tracking import open_tracker

log = logging.getLogger("fedmaml")


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
    convergence.png, and log them to the trackers of ``cfg.tracking`` (fedmaml/tracking/).

    The summary carries the run's status (fedmaml/federated/health.py): a run that diverges or
    fails stops at once with one line saying the round, the cause and what to try, and its model.pt
    holds the last good model. Every ``federated.checkpoint_every`` rounds, and when a stop is
    requested (SIGINT/SIGTERM), the run directory gets a checkpoint; ``resume`` continues from it
    (fedmaml/federated/checkpoint.py)."""
    setup = setup_for(cfg)
    strategy = MetaStrategy(setup)
    saved = checkpoint.load(run_dir) if resume else None
    recorder = RunRecorder(run_dir, cfg, metrics=saved["metrics"] if saved else None)
    tracker = open_tracker(cfg, run_dir)
    rounds = cfg.federated.rounds
    progress = Progress(rounds, quiet=quiet)
    health = run_health(cfg)
    key = "accuracy" if setup.classification else "loss"
    # what the summary reports besides the health totals (kept in checkpoints)
    state = new_run_state()
    if saved is not None:
        health.restore(saved["health"])
        state = saved["app"]
        state["provenance"] = run_provenance(state.get("provenance"))  # the first segment's stays
        checkpoint.set_rng_state(saved["rng"])
    every = cfg.federated.checkpoint_every

    def save_checkpoint(server_round: int) -> None:
        try:
            memories = strategy.checkpoint_memories(grid)
        except FedmamlError as e:  # the previous checkpoint (if any) stays
            log.warning("round %d: no checkpoint written: %s", server_round, e)
            return
        checkpoint.save(run_dir, {
            "round": server_round, "seconds": state["seconds"], "rng": checkpoint.rng_state(),
            "strategy": strategy.checkpoint_state(), "memories": memories,
            "health": health.state(), "app": state, "metrics": recorder.text()}, cfg)

    eval_round: list[int | None] = [None]  # of state["last_eval"]; unknown after a resume

    def on_round(row: dict[str, Any]) -> None:
        r = row["round"]
        if r > 0 and faults.enabled(cfg):  # what was injected, beside what was counted
            row["injected"] = faults.injected(cfg, row["clients"], r)
            for k, n in row["injected"].items():
                state["injected"][k] += n
        recorder.log_round(row)
        state["seconds"] = row["seconds"]
        tracker.log_round(row)
        if "pattern_selection" in row:  # the table also gets a file of its own
            write_selection(run_dir, row["pattern_selection"])
        health.observe(row, strategy.last_error)  # raises RunStopped: diverged or failed
        note_evaluation(state, row)
        if "eval" in row:
            eval_round[0] = r
        stop = checkpoint.stop_requested()
        if r < rounds and (stop or (every and r > 0 and r % every == 0)):
            save_checkpoint(r)
        if stop and r < rounds:
            raise RunStopped("interrupted", r, f"interrupted after round {r}; resume with: "
                             f"fedmaml run --resume {run_dir}")
        progress.update(r, progress_info(row, state, key, eval_round))

    timeout = cfg.federated.round_timeout or None
    status, message, model = "completed", "", None
    try:
        # collections skip what existed before the run (collector.py); the progress bar stops
        # either way
        with collector.frozen(), progress:
            strategy.start(grid, R.to_record(setup.initial_params), rounds, timeout=timeout,
                           on_round=on_round, resume=saved)
    except RunStopped as stop:  # diverged, failed or interrupted: the summary says which
        status, message = stop.status, stop.message
        model = strategy.w_before_update if stop.distrust_w else strategy.w
        (log.warning if status == "interrupted" else log.error)("%s", message)
    except BaseException as e:  # a crash: the trackers' runs end too, as what happened
        tracker.abort("interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
        raise
    summary = run_summary(cfg, strategy, health, state, status, message)
    recorder.finish(summary, strategy.w if model is None else model, state["provenance"])
    if status != "interrupted":  # the summary says what the run became; nothing to resume
        checkpoint.remove(run_dir)
    plot_run(run_dir)
    tracker.finish(summary, run_dir)
    return summary


def run_health(cfg: Config) -> RunHealth:
    """The health rules of a run, with what to try when it diverges."""
    return RunHealth(cfg.federated.max_failed_rounds,
                     hint=f"a smaller algorithm.eta (now {cfg.algorithm.eta:g}) or "
                          f"federated.server_lr (now {cfg.federated.server_lr:g})",
                     rounds=cfg.federated.rounds)


def new_run_state() -> dict[str, Any]:
    """What a run's summary reports besides the health totals (kept in checkpoints): faults
    injected, the first and last evaluation, the running clock and the provenance of the code,
    taken now, at the run's start (fedmaml/provenance.py)."""
    return {"injected": {k: 0 for k in faults.KINDS}, "first_eval": {}, "last_eval": {},
            "seconds": 0.0, "provenance": run_provenance()}


def progress_info(row: dict[str, Any], state: dict[str, Any], key: str,
                  eval_round: list[int | None]) -> str:
    """The progress line's info: the last evaluation first, with the round it was made at (it
    stays the same between evaluations), then this round's training loss and replies."""
    parts = []
    shown = state["last_eval"].get(f"seen.{key}.mean")
    if shown is not None:
        at = f" @r{eval_round[0]}" if eval_round[0] is not None else ""
        parts.append(f"eval {key} {shown:.4g}{at}")
    if "loss_after" in row:
        parts.append(f"train {row['loss_after']:.4g}")
    if "replies" in row:
        failed = f", {row['failures']} failed" if row["failures"] else ""
        parts.append(f"replies {row['replies']}/{len(row['clients'])}{failed}")
    return " | ".join(parts)


def note_evaluation(state: dict[str, Any], row: dict[str, Any]) -> None:
    """Keep an evaluation row's metrics as the run's last (and, the first time, first) ones."""
    if "eval" in row:
        state["last_eval"] = dict(row["eval"])
        if not state["first_eval"]:
            state["first_eval"] = dict(row["eval"])


def run_summary(cfg: Config, strategy: MetaStrategy, health: RunHealth, state: dict[str, Any],
                status: str, message: str) -> dict[str, Any]:
    """summary.json of a run that ended with ``status`` (``message``: why it stopped early)."""
    key = "accuracy" if strategy.setup.classification else "loss"
    summary = {
        "name": cfg.name,
        "algorithm": cfg.algorithm.name,
        "status": status,
        **({"message": message} if message else {}),
        "rounds": cfg.federated.rounds,
        **health.totals(),
        **({"injected": state["injected"]} if faults.enabled(cfg) else {}),
        "metric": key,
        "eval_steps": cfg.evaluation.steps,
        "before": {k: v for k, v in state["first_eval"].items() if not k.endswith(".clients")},
        "after": {k: v for k, v in state["last_eval"].items() if not k.endswith(".clients")},
        "seconds": state["seconds"],
    }
    summary["participation"] = strategy.participation_summary()
    if (privacy := strategy.privacy.summary()) is not None:
        summary["privacy"] = privacy
    if strategy.selector.record is not None:
        summary["pattern_selection"] = selection_summary(strategy.selector.record)
    if state.get("config_changes"):  # what a resume changed, and when (fedmaml/run_dir.py)
        summary["config_changes"] = state["config_changes"]
    return summary


# The app that ``flwr run .`` loads (see [tool.flwr.app.components] in pyproject.toml).
app = make_server_app()
