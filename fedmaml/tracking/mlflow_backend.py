"""MLflow: one MLflow run per fedmaml run, in the experiment ``tracking.project``.

The store is ``tracking.mlflow_uri``, by default the SQLite database ``<output_dir>/mlflow.db`` (the
store MLflow recommends since MLflow 3 keeps the file store in maintenance mode), with the runs' files
in ``<output_dir>/mlartifacts``: one store for the runs of an output directory or a sweep, so that
``mlflow ui --backend-store-uri sqlite:///<output_dir>/mlflow.db`` compares them, and
``MlflowClient`` reads it without extra environment variables. A file store (a path or ``file:``
URI) still works when given. Every config key (but output_dir and tracking.*) is a parameter;
metrics are sent in batches (about every :data:`FLUSH_SECONDS`, and at the end); MLflow has no
histograms, so per-client distributions are left out. At the end: the ``summary/`` metrics, the ``fedmaml.status`` tag, the run status
(FINISHED for completed, KILLED for interrupted, FAILED otherwise) and the files as artifacts.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedmaml.config.schema import TrackingConfig
from fedmaml.errors import ConfigError
from fedmaml.tracking.base import (COMPLETED, Backend, BackendUnavailable, RunInfo,
                                   summary_scalars)

FLUSH_SECONDS = 2.0
_BATCH = 900  # MLflow accepts at most 1000 metrics and 100 parameters per log_batch call
_PARAM_BATCH = 100


#: Files of the default store, in the output directory (fedmaml.tracking.base.TRACKER_DIRS too).
DATABASE = "mlflow.db"
ARTIFACTS = "mlartifacts"  # the name ``mlflow server`` gives its artifact directory


#: MLflow's HTTP retries, bounded (unless set already): by default MLflow retries a server that
#: does not answer for minutes (7 retries, backoff factor 2) before it fails; a run then waits
#: that long, silent, for a backend it drops anyway. The request timeout stays MLflow's (120 s):
#: uploading the model on a slow link may need it.
HTTP_ENVIRONMENT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class StoreUnavailable(BackendUnavailable):
    """The MLflow store of ``tracking.mlflow_uri`` cannot be opened (an unsupported scheme, a server
    that does not answer): the key, the value and MLflow's reason."""

    def __init__(self, uri: str, error: BaseException) -> None:
        super().__init__(f"tracking.mlflow_uri: the MLflow store {uri!r} could not start "
                         f"({type(error).__name__}: {_first_line(error)})")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _quiet_offline_environment(uri: str) -> None:
    """No telemetry; a file store given explicitly (in maintenance mode since MLflow 3, still
    working for reading and writing) allowed without an exception; HTTP retries bounded."""
    from fedmaml.tracking import QUIET_ENVIRONMENT

    for key, value in {**QUIET_ENVIRONMENT["mlflow"], **HTTP_ENVIRONMENT}.items():
        os.environ.setdefault(key, value)
    if is_file_store(uri):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def is_file_store(uri: str) -> bool:
    """A path or ``file:`` URI (as MLflow reads it; a one-letter scheme is a Windows drive)."""
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme
    return scheme in ("", "file") or len(scheme) == 1


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for any other store, and for in-memory)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix):] in ("", ":memory:"):
        return None
    return Path(uri[len(prefix):].split("?", 1)[0])


def default_uri(output_dir: Path) -> str:
    return f"sqlite:///{(Path(output_dir).resolve() / DATABASE).as_posix()}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its runs' files: beside the database."""
    database = sqlite_path(uri)
    return (database.resolve().parent / ARTIFACTS).as_uri() if database is not None else None


def mlflow_status(status: str) -> str:
    return {COMPLETED: "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")


def open_client(uri: str) -> Any:
    """An MlflowClient on ``uri``, set up to stay offline, its store reached once (so that a store
    which cannot start raises :class:`StoreUnavailable` here, not in the middle of a run)."""
    _quiet_offline_environment(uri)
    try:
        client = _open_client(uri)
        client.search_experiments(max_results=1)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any store error: MLflow's own, or a connection's
        raise StoreUnavailable(uri, e) from e
    return client


def _open_client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    database = sqlite_path(uri)
    if database is not None:
        return _open_sqlite(uri, database)
    if is_file_store(uri):
        # MLflow keeps one store object per URI for the whole process, which fails if the store's
        # directory was deleted since (a second run into a cleaned output directory): lay out
        # again what the file store creates when it opens (the root and its .trash folder).
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        path = url2pathname(urlparse(uri).path) if uri.startswith("file:") else uri
        (Path(path) / ".trash").mkdir(parents=True, exist_ok=True)

    return MlflowClient(tracking_uri=uri)


def _open_sqlite(uri: str, database: Path) -> Any:
    """An MlflowClient on a SQLite store, the database created (with MLflow's tables) if needed.

    MLflow creates the tables when it first opens a database: parallel sweep workers opening a new
    one at once would both try, so the first opening holds a lock on the database's directory.
    MLflow also keeps one store and one connection pool per URI for the process: if the database
    was deleted since (a second run into a cleaned output directory), they would go on writing to
    the deleted file, so they are dropped first."""
    import importlib.util

    from mlflow.tracking import MlflowClient

    missing = [p for p in ("sqlalchemy", "alembic") if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(f"tracking.mlflow_uri: {uri!r} is a SQLite store, which needs "
                          f"{' and '.join(missing)} (not installed); pip install "
                          "\"fedmaml[mlflow]\", or set tracking.mlflow_uri to another store")
    database.parent.mkdir(parents=True, exist_ok=True)
    if not database.exists():
        _forget_store(uri)
    with _directory_lock(database.parent):
        # SQLite would create the file 0644 minus the umask; an empty file (an empty database to
        # SQLite) created here follows the umask as every other file of a run does.
        database.touch(exist_ok=True)
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # opens the store: creates the tables if needed
    return client


def _forget_store(uri: str) -> None:
    """Drop MLflow's cached store and engine of ``uri`` (private MLflow state: skipped if an MLflow
    version lays it out differently; a deleted database then fails loudly at the first write)."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        _tracking_store_registry._get_store_with_resolved_uri.cache_clear()
        engine = SqlAlchemyStore._engine_map.pop(uri, None)
        if engine is not None:
            engine.dispose()
    except (ImportError, AttributeError):
        pass


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock between processes, held on the directory itself (no lock file left
    behind); a no-op where ``fcntl`` does not exist (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def experiment_id(client: Any, name: str, artifact_location: str | None = None) -> str:
    """The experiment called ``name``, created if needed (parallel sweep workers may race), with
    its files in ``artifact_location`` (MLflow's default for a database store is ``./mlruns`` in
    whatever the current directory is)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class MLflowBackend(Backend):
    name = "mlflow"

    def __init__(self, info: RunInfo, tracking: TrackingConfig) -> None:
        from mlflow.entities import Param

        self.uri = tracking.mlflow_uri or default_uri(info.output_dir)
        self.client = open_client(self.uri)
        tags = {"fedmaml.run_dir": str(info.run_dir.resolve())}
        if info.group:
            tags["fedmaml.sweep"] = info.group
        try:
            run = self.client.create_run(experiment_id(self.client, info.project,
                                                       artifact_location(self.uri)),
                                         run_name=info.name, tags=tags)
        except Exception as e:  # noqa: BLE001 - the store opened but refuses the run
            raise StoreUnavailable(self.uri, e) from e
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
