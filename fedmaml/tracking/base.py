"""What every tracking backend receives, and how a ``metrics.jsonl`` row becomes its scalars.

Names are the row's keys, nested keys joined by ``/``: ``loss_after`` is ``row["loss_after"]`` and
``eval/seen.loss.mean`` is ``row["eval"]["seen.loss.mean"]``; the step is ``row["round"]``. Booleans
are logged as 0/1 and non-finite numbers (``null`` in metrics.jsonl) as NaN. Per-client lists
(``eval/seen.loss.clients``) are distributions, logged as histograms where the backend has them;
other lists (client ids) and strings are not metrics. The summary is flattened the same way under
``summary/``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Number
from pathlib import Path
from typing import Any

from fedmaml.errors import ConfigError

#: The run's files each backend stores (when they exist): the resolved config, the summary, the
#: final meta-model and the figures in the run directory (not those of baselines, which are runs of
#: their own).
ARTIFACT_NAMES = ("config.yaml", "summary.json", "model.pt")
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")

#: Directories the backends write (MLflow's artifacts beside its default database, an MLflow file
#: store when one is given, W&B offline runs in the run directory): they hold copies of run files,
#: not runs.
TRACKER_DIRS = ("mlartifacts", "mlruns", "wandb")

#: A run's end as the backends record it; ``completed`` unless the summary says otherwise.
COMPLETED = "completed"


@dataclass(frozen=True)
class RunInfo:
    """Who the run is, for every backend."""

    run_dir: Path
    output_dir: Path  # the directory holding the run directories (a sweep directory for a sweep)
    name: str  # the run directory relative to output_dir, e.g. "quickstart" or "beta=0.3,seed=0"
    project: str  # MLflow experiment, W&B project
    group: str | None  # the sweep directory's name for a run of a sweep (W&B group, MLflow tag)
    params: dict[str, bool | int | float | str]  # every config key (config_to_flat) but
    #                                              output_dir and tracking.*
    config: dict[str, Any]  # the same, nested (config_to_dict), for W&B
    hparams: dict[str, bool | int | float | str]  # TensorBoard HParams: the grid keys and the seed
    #                                               for a run of a sweep, else every config key


def _number(value: Any) -> float:
    x = float(value)
    return x if math.isfinite(x) else math.nan


def flatten(row: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, float],
                                                                 dict[str, list[float]]]:
    """``(scalars, histograms)`` of a metrics row (without its ``round``) or of a summary."""
    scalars: dict[str, float] = {}
    histograms: dict[str, list[float]] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if not prefix and key == "round":
            continue
        if isinstance(value, Mapping):
            s, h = flatten(value, name + "/")
            scalars.update(s)
            histograms.update(h)
        elif isinstance(value, bool):
            scalars[name] = float(value)
        elif value is None or isinstance(value, Number):
            scalars[name] = math.nan if value is None else _number(value)
        elif isinstance(value, (list, tuple)) and str(key).endswith(".clients"):
            values = [_number(v) for v in value if isinstance(v, Number)
                      and not isinstance(v, bool)]
            histograms[name] = [v for v in values if not math.isnan(v)]
    return scalars, histograms


def summary_scalars(summary: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a summary.json as ``summary/<path>`` scalars (lists left out; the
    ``provenance`` block describes the code, not the run, and trackers never receive it)."""
    return flatten({k: v for k, v in summary.items() if k != "provenance"}, "summary/")[0]


def artifact_files(run_dir: Path) -> list[Path]:
    """The files of :data:`ARTIFACT_NAMES` and the figures that exist in ``run_dir``, in order."""
    if not run_dir.is_dir():
        return []
    files = [run_dir / n for n in ARTIFACT_NAMES if (run_dir / n).is_file()]
    return files + sorted(p for p in run_dir.iterdir()
                          if p.is_file() and p.suffix in FIGURE_SUFFIXES)


class Backend(ABC):
    """One tracking backend's view of one run. Opening it starts the run on the backend (config
    logged as parameters); ``finish`` or ``abort`` ends it."""

    name: str = ""

    @abstractmethod
    def log_round(self, step: int, scalars: dict[str, float],
                  histograms: dict[str, list[float]]) -> None:
        """One round's metrics (:func:`flatten` of its row) at step ``step``."""

    @abstractmethod
    def finish(self, status: str, summary: Mapping[str, Any], files: list[Path]) -> None:
        """End the run: its status, its summary (``summary/`` scalars and the whole dict) and its
        files as artifacts."""

    @abstractmethod
    def abort(self, status: str) -> None:
        """End the run early (``failed`` or ``interrupted``): record what is known, store nothing
        more."""


class BackendUnavailable(ConfigError):
    """A backend that cannot start (its store unreachable): reported and dropped, the run goes
    on; a ConfigError all the same where nothing goes on without it (``fedmaml export``)."""
