"""One ``metrics.jsonl`` row: the typed definition that a run alone (``MetaStrategy.start``,
fedmaml/federated/strategy.py) and a batch of runs (fedmaml/engines/run_batch.py) both fill in, so
that the two write the same keys in the same order.

A row's keys, in the order :meth:`MetricsRow.as_dict` writes them (a key whose field is ``None`` is
left out):

* ``round`` (0: the evaluation before training);
* ``available``: clients available this round, under a participation model other than uniform;
* the round's record, for rounds >= 1 (:func:`round_fields`): ``clients`` (sampled ids),
  ``replies`` (valid), ``failures`` (errors, malformed and missing replies and rejected updates),
  ``failures_by_kind`` (``error``, ``timeout``, ``malformed``), ``rejected`` (updates holding
  NaN/inf), ``updated`` (whether ``w`` changed), ``diverged`` (only when the aggregated update was
  not finite: why);
* when at least one reply was valid: ``loss_before`` / ``loss_after`` (the clients' mean, when
  their algorithm reports them), then ``samples`` (the running total below takes this place) and
  ``train_seconds_max``;
* ``pattern_selection``: the Lambda-pattern selection's table, on the rounds it runs;
* ``eval`` on evaluation rounds (``<group>.<metric>.<stat>``, ``<group>.<metric>.clients``,
  ``<group>.ids``, ``eval-failures``, the memory diagnostics of ``MetaStrategy.memory_metrics`` and
  ``seen.staleness.*``);
* ``memory_resets`` / ``memory_reset_clients``: only when a device's corrupt memory file was
  replaced by a fresh memory (``memory-reset=true``);
* always the running totals ``samples`` (training examples drawn by clients that replied),
  ``bytes_up`` / ``bytes_down`` (array bytes of training replies / instructions; evaluation traffic
  is a measurement, not part of the algorithm's cost, and is not counted) and ``seconds`` since the
  run's start;
* ``injected``: the faults injected this round (fedmaml/federated/faults.py), when faults are on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

#: The round record's keys, in the row's order (the server round's accounting).
ROUND_KEYS = ("clients", "replies", "failures", "failures_by_kind", "rejected", "updated",
              "diverged")


def round_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """The row's fields of a round's bookkeeping that holds a server round's record among other
    keys (its keys of :data:`ROUND_KEYS`; the strategy's ``round_stats``). A record itself gives
    exactly these fields (``RoundRecord.row()``, fedmaml/federated/server_round.py)."""
    return {k: record[k] for k in ROUND_KEYS if k in record}


@dataclass
class MetricsRow:
    """One round of a run as ``metrics.jsonl`` holds it (the module's docstring lists the keys)."""

    round: int
    available: int | None = None
    # the round's record (round_fields)
    clients: list[int] | None = None
    replies: int | None = None
    failures: int | None = None
    failures_by_kind: dict[str, int] | None = None
    rejected: int | None = None
    updated: bool | None = None
    diverged: str | None = None
    # the clients' training metrics (when a reply was valid)
    loss_before: float | None = None
    loss_after: float | None = None
    train_seconds_max: float | None = None
    pattern_selection: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    memory_resets: int | None = None
    memory_reset_clients: list[int] | None = None
    # the running totals
    samples: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    injected: dict[str, int] | None = None

    @property
    def trained(self) -> bool:
        """Whether a reply of this round was valid (its training metrics are in the row)."""
        return self.train_seconds_max is not None

    def set_train(self, metrics: Mapping[str, Any]) -> None:
        """The clients' training metrics as a round reports them (``loss-before``,
        ``loss-after``, ``train-seconds-max``; the round's own ``samples`` only adds to the
        running total, which the caller keeps)."""
        for key, value in metrics.items():
            name = key.replace("-", "_")
            if name in _TRAIN:
                setattr(self, name, value)

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> "MetricsRow":
        """A row as written (a line of metrics.jsonl, or :meth:`as_dict`). ``null`` floats are the
        NaN/inf the file cannot hold (fedmaml/results/recorder.py) and come back as NaN."""
        unknown = [k for k in row if k not in _ORDER]
        if unknown:
            raise ValueError(f"metrics row of round {row.get('round')}: unknown key(s) "
                             f"{', '.join(map(repr, unknown))}; a row holds {', '.join(_ORDER)}")
        values = {k: (math.nan if v is None and k in _FLOATS else v) for k, v in row.items()}
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """The row as written: today's keys in today's order, absent fields left out."""
        trained = self.trained
        row: dict[str, Any] = {}
        for name, value in vars(self).items():  # the fields, in their order (set by __init__)
            if value is None or (name == "samples" and trained):  # training put it elsewhere
                continue
            if name == "train_seconds_max":
                row["samples"] = self.samples
            row[name] = value
        return row


_TRAIN = ("loss_before", "loss_after", "train_seconds_max")
_FLOATS = (*_TRAIN, "seconds")
_ORDER = tuple(f.name for f in fields(MetricsRow))
