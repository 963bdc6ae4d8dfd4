"""MLflow: one MLflow run per fedmaml run, in the experiment ``tracking.project``.

The store is ``tracking.mlflow_uri``, by default a file store in ``<output_dir>/mlruns``: one store
for the runs of an output directory or a sweep, so that ``mlflow ui --backend-store-uri
<output_dir>/mlruns`` compares them. Every config key (but output_dir and tracking.*) is a
parameter; metrics are sent in batches (about every :data:`FLUSH_SECONDS`, and at the end) because
the file store writes one file per metric; MLflow has no histograms, so per-client distributions
are left out. At the end: the ``summary/`` metrics, the ``fedmaml.status`` tag, the run status
(FINISHED for completed, KILLED for interrupted, FAILED otherwise) and the files as artifacts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmaml.tracking.base import COMPLETED, TRACKER_DIRS, Backend, RunInfo, summary_scalars

FLUSH_SECONDS = 2.0
_BATCH = 900  # MLflow accepts at most 1000 metrics and 100 parameters per log_batch call
_PARAM_BATCH = 100


def _quiet_offline_environment(uri: str) -> None:
    """No telemetry; the file store (in maintenance mode since MLflow 3.x, still working for
    reading and writing) allowed without an exception."""
    from fedmaml.tracking import QUIET_ENVIRONMENT

    for key, value in QUIET_ENVIRONMENT["mlflow"].items():
        os.environ.setdefault(key, value)
    if is_file_store(uri):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def is_file_store(uri: str) -> bool:
    """A path or ``file:`` URI (as MLflow reads it; a one-letter scheme is a Windows drive)."""
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme
    return scheme in ("", "file") or len(scheme) == 1


def default_uri(output_dir: Path) -> str:
    return (Path(output_dir).resolve() / TRACKER_DIRS[0]).as_uri()


def mlflow_status(status: str) -> str:
    return {COMPLETED: "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")


def open_client(uri: str) -> Any:
    """An MlflowClient on ``uri``, set up to stay offline."""
    _quiet_offline_environment(uri)
    from mlflow.tracking import MlflowClient

    if is_file_store(uri):
        # MLflow keeps one store object per URI for the whole process, which fails if the store's
        # directory was deleted since (a second run into a cleaned output directory): lay out
        # again what the file store creates when it opens (the root and its .trash folder).
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        path = url2pathname(urlparse(uri).path) if uri.startswith("file:") else uri
        (Path(path) / ".trash").mkdir(parents=True, exist_ok=True)

    return MlflowClient(tracking_uri=uri)


def experiment_id(client: Any, name: str) -> str:
    """The experiment called ``name``, created if needed (parallel sweep workers may race)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class MLflowBackend(Backend):
    name = "mlflow"

    def __init__(self, info: RunInfo, tracking: Any) -> None:
        from mlflow.entities import Param

        self.uri = tracking.mlflow_uri or default_uri(info.output_dir)
        self.client = open_client(self.uri)
        tags = {"fedmaml.run_dir": str(info.run_dir.resolve())}
        if info.group:
            tags["fedmaml.sweep"] = info.group
        run = self.client.create_run(experiment_id(self.client, info.project), run_name=info.name,
                                     tags=tags)
        self.run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in info.params.items()]
        for i in range(0, len(params), _PARAM_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + _PARAM_BATCH])
        self.pending: list[Any] = []  # metrics not yet sent
        self.last_flush = time.monotonic()
        self.step = 0

    def log_round(self, step: int, scalars: dict[str, float],
                  histograms: dict[str, list[float]]) -> None:
        self.step = step
        self._add(scalars, step)
        if time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self._flush()

    def finish(self, status: str, summary: Mapping[str, Any], files: list[Path]) -> None:
        self._add(summary_scalars(summary), self.step)
        self._flush()
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        self._end(status)

    def abort(self, status: str) -> None:
        self._flush()
        self._end(status)

    def _add(self, scalars: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, v, now, step) for k, v in scalars.items())

    def _flush(self) -> None:
        # Synchronous: MLflow's asynchronous logging wrote batches of one run concurrently, and
        # the file store then read a metric file while another batch was appending to it.
        for i in range(0, len(self.pending), _BATCH):
            self.client.log_batch(self.run_id, metrics=self.pending[i:i + _BATCH])
        self.pending = []
        self.last_flush = time.monotonic()

    def _end(self, status: str) -> None:
        self.client.set_tag(self.run_id, "fedmaml.status", status)
        self.client.set_terminated(self.run_id, mlflow_status(status))
