"""TensorBoard: event files in the run directory (``tensorboard --logdir <output_dir>``).

Scalars every round, per-client histograms at evaluation rounds, the config as text, and at the end
the summary (``summary/`` scalars and text), the status, the figures as images and the HParams
entry (hyperparameters: the grid keys and seed of a sweep, else every key; metrics: the evaluation
means and the training loss). model.pt and the other files already sit in the run directory that
TensorBoard reads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmaml.config.schema import TrackingConfig
from fedmaml.tracking.base import Backend, RunInfo, summary_scalars

#: Seconds between flushes of the event file: a live run shows up in TensorBoard this late at most.
FLUSH_SECONDS = 5


class TensorBoardBackend(Backend):
    name = "tensorboard"

    def __init__(self, info: RunInfo, tracking: TrackingConfig) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.info = info
        self.writer = SummaryWriter(log_dir=str(info.run_dir), flush_secs=FLUSH_SECONDS)
        self.writer.add_text("config", _markdown_table(info.params), 0)
        self.tags: list[str] = []  # scalar tags in first-seen order, for the HParams metrics
        self.step = 0

    def log_round(self, step: int, scalars: dict[str, float],
                  histograms: dict[str, list[float]]) -> None:
        import numpy as np

        self.step = step
        for tag, value in scalars.items():
            if tag not in self.tags:
                self.tags.append(tag)
            self.writer.add_scalar(tag, value, step)
        for tag, values in histograms.items():
            if values:
                self.writer.add_histogram(tag, np.asarray(values, dtype=np.float64), step)

    def finish(self, status: str, summary: Mapping[str, Any], files: list[Path]) -> None:
        for tag, value in summary_scalars(summary).items():
            self.writer.add_scalar(tag, value, self.step)
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=2, default=str)
                             + "\n```", self.step)
        for path in files:
            if path.suffix == ".png":  # TensorBoard shows images; other formats stay files
                self.writer.add_image(f"figures/{path.stem}", _read_png(path), self.step,
                                      dataformats="HWC")
        self._end(status)

    def abort(self, status: str) -> None:
        self._end(status)

    def _end(self, status: str) -> None:
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("status", status, self.step)
        metrics = [t for t in self.tags if t.endswith(".mean") or t == "loss_after"]
        for summary_proto in hparams(dict(self.info.hparams), {t: 0.0 for t in metrics}):
            self.writer.file_writer.add_summary(summary_proto)
        self.writer.close()


def _markdown_table(params: Mapping[str, Any]) -> str:
    return "| key | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in params.items())


def _read_png(path: Path) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))

