"""Weights & Biases: one W&B run per fedmaml run, offline by default.

Offline runs are written under ``<run_dir>/wandb/`` (``wandb sync <run_dir>/wandb/offline-run-*``
uploads them later); ``tracking.wandb_mode: online`` logs to the W&B server of ``wandb login``. The
project is ``tracking.project``, the group the sweep's name, the config the nested resolved config.
Scalars and per-client histograms every round; at the end the ``summary/`` values and ``status`` in
the run summary and the files saved with the run. System metrics, git and code capture are off:
they are not the experiment, and some of them look for cloud metadata on the network.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmaml.config.schema import TrackingConfig
from fedmaml.tracking.base import COMPLETED, Backend, RunInfo, summary_scalars


class WandbBackend(Backend):
    name = "wandb"

    def __init__(self, info: RunInfo, tracking: TrackingConfig) -> None:
        from fedmaml.tracking import QUIET_ENVIRONMENT

        for key, value in QUIET_ENVIRONMENT["wandb"].items():
            os.environ.setdefault(key, value)
        if tracking.wandb_mode == "offline":
            os.environ.setdefault("WANDB_MODE", "offline")
        import wandb

        self.wandb = wandb
        self.run_dir = info.run_dir
        info.run_dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(console="off", x_disable_stats=True, x_disable_meta=True,
                                  disable_git=True, save_code=False, disable_code=True)
        self.run = wandb.init(mode=tracking.wandb_mode, dir=str(info.run_dir),
                              project=info.project, name=info.name, group=info.group,
                              config=info.config, settings=settings, reinit="create_new")

    def log_round(self, step: int, scalars: dict[str, float],
                  histograms: dict[str, list[float]]) -> None:
        data: dict[str, Any] = dict(scalars)
        for tag, values in histograms.items():
            if values:
                data[tag] = self.wandb.Histogram(values)
        self.run.log(data, step=step)

    def finish(self, status: str, summary: Mapping[str, Any], files: list[Path]) -> None:
        self.run.summary.update(summary_scalars(summary))
        for path in files:
            self.run.save(str(path), base_path=str(self.run_dir), policy="now")
        self._end(status)

    def abort(self, status: str) -> None:
        self._end(status)

    def _end(self, status: str) -> None:
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status == COMPLETED else 1)
        # finish() can return before W&B's service process has written the whole run file; its
        # teardown waits for that (the next run starts a new service, in about 0.5 s).
        self.wandb.teardown()
