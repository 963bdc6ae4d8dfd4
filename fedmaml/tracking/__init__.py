"""Experiment tracking: a run's metrics, config, summary and files in TensorBoard, MLflow or W&B.

``tracking.backends`` in the config names the backends; each is an optional extra
(``pip install "fedmaml[tensorboard]"``, ``[mlflow]``, ``[wandb]``) imported only when named. The
ServerApp opens a :class:`Tracker` for the run, hands it every ``metrics.jsonl`` row as it is
written and the summary at the end; ``fedmaml export`` replays finished runs through the same
calls (:mod:`fedmaml.results.export`), so live and exported runs log the same names and values.

Tracking never changes a run: a backend that fails in the middle of a run is reported once and
dropped, the run goes on. Everything works offline (TensorBoard event files and W&B offline runs in
the run directory, an MLflow file store in the output directory) and no backend contacts a server
unless the config names one (``tracking.mlflow_uri``, ``tracking.wandb_mode: online``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedmaml.config.schema import Config
from fedmaml.errors import ConfigError
from fedmaml.tracking.base import (COMPLETED, Backend, BackendUnavailable, RunInfo,
                                   artifact_files, flatten)

log = logging.getLogger("fedmaml")

#: backend name -> (module, class, the package it needs; its extra has the backend's name)
BACKENDS = {
    "tensorboard": ("fedmaml.tracking.tensorboard_backend", "TensorBoardBackend", "tensorboard"),
    "mlflow": ("fedmaml.tracking.mlflow_backend", "MLflowBackend", "mlflow"),
    "wandb": ("fedmaml.tracking.wandb_backend", "WandbBackend", "wandb"),
}

#: Environment set (unless already set) before a backend's package is imported: no telemetry, no
#: chatter. Offline modes and stores are set where the backend opens its run.
QUIET_ENVIRONMENT = {
    "mlflow": {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"},
    "wandb": {"WANDB_SILENT": "true"},
}


def check_available(backends: tuple[str, ...] | list[str]) -> None:
    """Raise a ConfigError naming the extra to install when a backend's package is missing (it is
    imported here, before the run starts, which is where the run would import it anyway)."""
    import importlib
    import os

    for name in backends:
        package = BACKENDS[name][2]
        for key, value in QUIET_ENVIRONMENT.get(name, {}).items():
            os.environ.setdefault(key, value)
        try:
            importlib.import_module(package)
        except ImportError:
            raise ConfigError(f"tracking.backends: {name!r} needs the {package} package, which is "
                              f"not installed; pip install \"fedmaml[{name}]\" (or remove {name} "
                              "from tracking.backends)") from None


class Tracker:
    """The run as every configured backend sees it. With no backend every call does nothing.

    Use it as a context manager around the rounds: if they raise, the backends' runs end as
    ``interrupted`` (Ctrl-C) or ``failed`` instead of staying open.
    """

    def __init__(self, backends: list[Backend], strict: bool = False) -> None:
        self.backends = backends
        self.strict = strict  # raise a backend's error instead of dropping the backend (export)
        self.open = True

    def log_round(self, row: Mapping[str, Any]) -> None:
        if not self.backends:
            return
        scalars, histograms = flatten(row)
        self._each("log_round", int(row["round"]), scalars, histograms)

    def finish(self, summary: Mapping[str, Any], run_dir: str | Path) -> None:
        """End the run with the summary's ``status`` (``completed`` when it has none) and store
        the run directory's files (config, summary, model, figures)."""
        if self.open and self.backends:
            status = str(summary.get("status", COMPLETED))
            self._each("finish", status, summary, artifact_files(Path(run_dir)))
        self.open = False

    def abort(self, status: str) -> None:
        if self.open and self.backends:
            self._each("abort", status)
        self.open = False

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort("interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed")

    def _each(self, method: str, *args: Any) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as e:  # noqa: BLE001 - tracking must not stop the run
                if self.strict:
                    raise
                log.warning("tracking: %s failed (%s: %s); it logs nothing more for this run",
                            backend.name, type(e).__name__, e)
                self.backends.remove(backend)


def run_info(cfg: Config, run_dir: str | Path) -> RunInfo:
    """Name, project, group and hyperparameters of the run in ``run_dir`` (see RunInfo)."""
    from fedmaml.config import config_to_dict, config_to_flat, with_entries

    run_dir = Path(run_dir)
    output_dir = Path(cfg.output_dir)
    try:
        name = run_dir.resolve().relative_to(output_dir.resolve()).as_posix()
    except ValueError:
        name = run_dir.name
    # Where the run is stored and tracked is no hyperparameter (and differs for an export).
    params = {k: v for k, v in config_to_flat(cfg).items() if not _placement(k)}
    config = {k: v for k, v in config_to_dict(cfg).items() if not _placement(k)}
    grid = sweep_grid(run_dir)
    group = run_dir.resolve().parent.name if grid is not None else None
    if grid is None:
        hparams = params
    else:  # a swept entry of a mapping (algorithm.kwargs.lam) is one too, when the run has it
        entries = with_entries(params)
        hparams = {k: _scalar(entries[k]) for k in [*grid, "seed"] if k in entries}
    return RunInfo(run_dir=run_dir, output_dir=output_dir, name=name,
                   project=cfg.tracking.project or group or "fedmaml", group=group, params=params,
                   config=config, hparams=hparams)


def _scalar(value: Any) -> bool | int | float | str:
    """A hyperparameter as the backends take it: a list or a mapping (an entry of a mapping key
    may hold one) as its JSON text."""
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


def _placement(key: str) -> bool:
    return key == "output_dir" or key.split(".")[0] == "tracking"


def sweep_grid(run_dir: Path) -> list[str] | None:
    """The grid keys (and the keys its named settings set) of the sweep that ``run_dir`` belongs to
    (its parent holds the sweep manifest), or None for a run outside a sweep."""
    from fedmaml.sweep_spec import MANIFEST, load_sweep

    manifest = run_dir.resolve().parent / MANIFEST
    if not manifest.is_file():
        return None
    try:
        spec = load_sweep(manifest)[1]
    except ConfigError as e:  # an unreadable manifest: the run is still tracked, as a single run
        log.warning("tracking: %s is not a readable sweep manifest (%s); logging every config key "
                    "as a hyperparameter", manifest, e)
        return None
    # Named settings vary their keys as the grid does: those are hyperparameters too.
    return list(dict.fromkeys([*spec.grid, *(k for o in spec.settings.values() for k in o)]))


def open_tracker(cfg: Config, run_dir: str | Path, strict: bool = False) -> Tracker:
    """Start the run on every backend of ``cfg.tracking.backends`` (``strict``: see Tracker)."""
    import importlib

    names = cfg.tracking.backends
    if not names:
        return Tracker([])
    check_available(names)
    info = run_info(cfg, run_dir)
    backends: list[Backend] = []
    try:
        for name in names:
            module, cls, _ = BACKENDS[name]
            store = _store_key(name, cfg)
            if _failed is not None and store in _failed:  # tried in this scope: not again
                log.debug("tracking: %s; %s logs nothing for this run either", _failed[store],
                          name)
                continue
            try:
                backends.append(getattr(importlib.import_module(module), cls)(info, cfg.tracking))
            except Exception as e:  # noqa: BLE001 - tracking must not stop the run
                if strict or _missing_package(e):
                    raise
                reason = _start_failure(name, e)
                if _failed is not None:
                    _failed[store] = reason
                # the same failure of another scope (a second run of a notebook) is said once
                (log.debug if reason in _REPORTED else log.warning)(
                    "tracking: %s; %s logs nothing for this run, which goes on", reason, name)
                _REPORTED.add(reason)
    except BaseException:
        Tracker(backends).abort("failed")  # those opened already do not stay open
        raise
    return Tracker(backends, strict)


#: the start failures warned about in this process
_REPORTED: set[str] = set()

#: The backends that could not start in the :func:`one_attempt_per_store` scope that is open (None:
#: none is), by :func:`_store_key`, with why.
_failed: dict[tuple[Any, ...], str] | None = None


@contextlib.contextmanager
def one_attempt_per_store() -> Iterator[None]:
    """During the block (a run and its baselines, a batch, a sweep), a backend that could not start
    is not tried again for the next runs, which go on without it as the first did: each try of an
    MLflow server that does not answer costs seconds, and every run opens a tracker of its own. A
    block inside another shares the outer one's memory. Outside any block every run tries again,
    so a long-lived process (a notebook) finds a store that has come back."""
    global _failed
    if _failed is not None:
        yield
        return
    _failed = {}
    try:
        yield
    finally:
        _failed = None


def one_attempt_per_store_in_this_process() -> None:
    """:func:`one_attempt_per_store` for the rest of this process: a sweep's worker, whose runs and
    batches each open a block of their own, which would otherwise try the store once each."""
    global _failed
    if _failed is None:
        _failed = {}


def _store_key(name: str, cfg: Config) -> tuple[Any, ...]:
    """Backend ``name`` with everything that says where its store is: the tracking section, and the
    output directory (MLflow's default store is in it)."""
    return name, cfg.tracking, str(Path(cfg.output_dir).expanduser().resolve())


def _missing_package(error: Exception) -> bool:
    """A ConfigError naming a package to install (it stops the run, as a missing extra does);
    a store that cannot start is a ConfigError too, but only reported."""
    return isinstance(error, ConfigError) and not isinstance(error, BackendUnavailable)


def _start_failure(name: str, error: Exception) -> str:
    """Why backend ``name`` could not start: its own message when it names the key and value (an
    MLflow store), else the backend and the error."""
    if isinstance(error, ConfigError):
        return str(error)
    return f"tracking.backends: {name} could not start ({type(error).__name__}: {error})"
