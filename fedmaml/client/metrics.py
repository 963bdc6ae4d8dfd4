"""The names and assembly of a client's reply metrics, shared by every engine.

The names are the wire names of fedmaml/federated/records.py (which re-exports them): a vectorized
cohort, a batch of runs and a ClientApp report the same columns, built here once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedmaml.algorithms import RoundData
from fedmaml.data.tasks import Task

NUM_EXAMPLES, PARTITION = "num-examples", "partition-id"
#: A corrupt memory file was moved aside and the memory started again (``memory-reset=true``).
MEMORY_RESET = "memory-reset"


def samples_drawn(data: RoundData) -> int:
    """Training examples a round consumed (support, query, Hessian-free and memory-init batches);
    for stacked data, the sum over its clients."""
    batches = [data.support, data.query, data.extra, data.init]
    # targets are [..., n] (classification) or [..., n, 1] (regression): one number per example
    return sum(b[1].numel() for b in batches if b is not None)


def example_counts(tasks: Sequence[Sequence[Task]]) -> list[int]:
    """Each client's training examples (its update's weight under weighted aggregation)."""
    return [sum(t.num_examples for t in ts) for ts in tasks]


def metric_name(key: str) -> str:
    """An algorithm's metric (``loss_after``) as the reply names it (``loss-after``)."""
    return key.replace("_", "-")


def train_columns(tasks: Sequence[Sequence[Task]], samples: Sequence[int],
                  seconds: Sequence[float], metrics: dict[str, torch.Tensor | Sequence[float]]
                  ) -> dict[str, list[Any]]:
    """The train metrics of clients (row ``j`` of every column is client ``j``): examples, samples
    drawn, simulated train time, then the algorithm's metrics in its order."""
    def values(v: Any) -> list[float]:
        return v.tolist() if isinstance(v, torch.Tensor) else [float(x) for x in v]
    return {NUM_EXAMPLES: example_counts(tasks), "samples": list(samples),
            "train-seconds": list(seconds), **{metric_name(k): values(v) for k, v in metrics.items()}}


def train_metrics(cid: int, tasks: Sequence[Task], data: RoundData, metrics: dict[str, Any],
                  seconds: float) -> dict[str, Any]:
    """One client's train metrics (its reply's MetricRecord)."""
    return {NUM_EXAMPLES: sum(t.num_examples for t in tasks), PARTITION: cid,
            "samples": samples_drawn(data), "train-seconds": seconds,
            **{metric_name(k): float(v) for k, v in metrics.items()}}
