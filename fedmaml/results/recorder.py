"""A run directory: ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per round),
``summary.json`` (status and final numbers), ``model.pt`` (final meta-model) and, while a run can be
resumed, ``checkpoint.pt`` (fedmaml/federated/checkpoint.py). Files other than the append-only metrics log
are written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedmaml.atomic import atomic_torch_save, atomic_write_text
from fedmaml.config.schema import Config
from fedmaml.core.params import Params
from fedmaml.provenance import with_provenance

from fedmaml.results.run_files import (CONFIG_FILE, METRICS_FILE, MODEL_FILE, SUMMARY_FILE,
                                       read_metrics, read_summary)

__all__ = ["CONFIG_FILE", "METRICS_FILE", "MODEL_FILE", "SUMMARY_FILE", "RunRecorder",
           "read_metrics", "read_summary"]


def _clean(value: Any) -> Any:
    """JSON-safe values: NaN/inf become null (strict JSON readers reject them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _json_line(row: dict[str, Any]) -> str:
    """One metrics line. Rows are almost always finite: the encoder's own check finds the rare
    NaN/inf, which only then pays for the walk of :func:`_clean` over every value."""
    try:
        return json.dumps(row, allow_nan=False) + "\n"
    except ValueError:
        return json.dumps(_clean(row)) + "\n"


class RunRecorder:
    """``metrics``: the metrics.jsonl text of a checkpoint to continue after (a resumed run)."""

    def __init__(self, run_dir: str | Path, config: Config, metrics: str | None = None) -> None:
        from fedmaml.config import dump_yaml

        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / CONFIG_FILE, dump_yaml(config))
        (self.dir / SUMMARY_FILE).unlink(missing_ok=True)  # a summary marks a finished run
        if metrics is not None:  # rows written after the checkpoint (a round cut short) go
            atomic_write_text(self.dir / METRICS_FILE, metrics)
        self._metrics = open(self.dir / METRICS_FILE, "a" if metrics is not None else "w",
                             encoding="utf-8")

    def text(self) -> str:
        """The metrics.jsonl lines written so far."""
        return (self.dir / METRICS_FILE).read_text(encoding="utf-8")

    def log_round(self, row: dict[str, Any]) -> None:
        """Append one row, flushed: it is in the file before anyone acts on it."""
        self.log_rounds([row])

    def log_rounds(self, rows: list[dict[str, Any]]) -> None:
        """Append rows and flush once (a vectorized sweep writes its rows a few hundred at a time)."""
        if rows:
            self._metrics.write("".join(_json_line(row) for row in rows))
            self._metrics.flush()

    def finish(self, summary: dict[str, Any], params: Params,
               provenance: dict[str, Any] | None = None) -> None:
        """``provenance``: the run's, taken at its start (fedmaml/provenance.py run_provenance;
        None: this process's)."""
        self._metrics.close()
        atomic_torch_save({k: v.detach().cpu() for k, v in params.items()}, self.dir / MODEL_FILE)
        # The version and commit that produced the numbers (fedmaml/provenance.py); only in the
        # file: the tracking backends get the summary as the run computed it.
        record = with_provenance(summary) if provenance is None else {**summary,
                                                                      "provenance": provenance}
        atomic_write_text(self.dir / SUMMARY_FILE, json.dumps(_clean(record), indent=2) + "\n")

