"""``fedmaml export RUN_DIR... --to tensorboard|mlflow|wandb``: runs written to a tracking backend
after the fact.

Each run directory (or every run under a sweep or results directory) is replayed through the same
:class:`~fedmaml.tracking.Tracker` calls as a live run: its config, every row of metrics.jsonl, then
summary.json and its files. A run without summary.json (interrupted, or still running) is exported
with the rows it has and ends as ``interrupted``. A run already logged to the backend (live or by an
earlier export) is refused rather than logged twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedmaml.config.schema import Config
from fedmaml.errors import FedmamlError
from fedmaml.results.run_files import main_run_of
from fedmaml.tracking import open_tracker, run_info


def export_runs(paths: list[str | Path], to: str, *, mlflow_uri: str | None = None,
                project: str | None = None, wandb_mode: str | None = None) -> list[Path]:
    """Export every run directory at or under ``paths`` to backend ``to``; returns them."""
    from fedmaml.results.compare import find_run_dirs

    run_dirs = find_run_dirs(paths)
    for run_dir in run_dirs:
        export_run(run_dir, to, mlflow_uri=mlflow_uri, project=project, wandb_mode=wandb_mode)
    return run_dirs


def output_dir_of(run_dir: Path) -> Path:
    """The directory that holds the run directory: its parent, or for a ``compare_with`` baseline
    (``<run>/baselines/<algorithm>``) its main run's."""
    return (main_run_of(run_dir) or run_dir).parent


def export_config(run_dir: Path, to: str, **options: str | None) -> Any:
    """The run's config, tracking ``to`` only, with the given tracking options, and the output
    directory where the run directory is now (it may have moved since the run)."""
    from fedmaml.config import load_config, replace_paths
    from fedmaml.results.recorder import CONFIG_FILE

    updates: dict[str, Any] = {"tracking.backends": [to],
                               "output_dir": str(output_dir_of(run_dir))}
    updates.update({f"tracking.{k}": v for k, v in options.items() if v is not None})
    return replace_paths(load_config(run_dir / CONFIG_FILE), updates)


def export_run(run_dir: str | Path, to: str, **options: str | None) -> None:
    from fedmaml.results.recorder import read_metrics, read_summary

    run_dir = Path(run_dir)
    cfg = export_config(run_dir, to, **options)
    already = logged_before(run_dir, cfg)
    if already:
        raise FedmamlError(f"{run_dir}: already logged to {to} ({already}); delete that to "
                           "export the run again")
    rows, summary = read_metrics(run_dir), read_summary(run_dir)
    tracker = open_tracker(cfg, run_dir, strict=True)
    with tracker:
        for row in rows:
            tracker.log_round(row)
    if summary is None:
        tracker.abort("interrupted")
    else:
        tracker.finish(summary, run_dir)


def logged_before(run_dir: Path, cfg: Config) -> str:
    """Where ``run_dir`` was logged to the backend of ``cfg`` before, or "" if it was not."""
    backend = cfg.tracking.backends[0]
    if backend == "tensorboard":
        events = sorted(run_dir.glob("events.out.tfevents.*"))
        return f"event file {events[0].name}" if events else ""
    if backend == "wandb":
        runs = sorted((run_dir / "wandb").glob("*run-*"))
        return f"W&B run {runs[0]}" if runs else ""
    from fedmaml.tracking.mlflow_backend import default_uri, open_client

    info = run_info(cfg, run_dir)
    client = open_client(cfg.tracking.mlflow_uri or default_uri(info.output_dir))
    experiment = client.get_experiment_by_name(info.project)
    if experiment is None:
        return ""
    path = str(run_dir.resolve()).replace("'", "\\'")
    found = client.search_runs([experiment.experiment_id],
                               filter_string=f"tags.`fedmaml.run_dir` = '{path}'", max_results=1)
    return f"MLflow run {found[0].info.run_id} in experiment {info.project!r}" if found else ""
