"""The metrics row's one definition (fedmaml/results/metrics_row.py): the keys and their order
that a run alone and a batch both write, absent fields left out, and a row read back as the type."""

from __future__ import annotations

import math

import pytest

from fedmaml.results.metrics_row import MetricsRow, round_fields

RECORD = {"clients": [4, 0, 2], "replies": 2, "failures": 1,
          "failures_by_kind": {"error": 1, "timeout": 0, "malformed": 0}, "rejected": 0,
          "updated": True, "cohorts": ["the round's own bookkeeping, not the row's"]}


def trained_row() -> MetricsRow:
    row = MetricsRow(3, available=5, **round_fields(RECORD))
    row.set_train({"loss-before": 0.9, "loss-after": 0.5, "samples": 40,
                   "train-seconds-max": 0.01})
    row.eval = {"seen.loss.mean": 0.4}
    row.memory_resets, row.memory_reset_clients = 1, [2]
    row.samples, row.bytes_up, row.bytes_down, row.seconds = 120, 300, 900, 1.5
    return row


def test_a_trained_round_writes_its_keys_in_the_documented_order():
    row = trained_row().as_dict()
    assert list(row) == ["round", "available", "clients", "replies", "failures",
                         "failures_by_kind", "rejected", "updated", "loss_before", "loss_after",
                         "samples", "train_seconds_max", "eval", "memory_resets",
                         "memory_reset_clients", "bytes_up", "bytes_down", "seconds"]
    # the running total takes the place of the round's own count
    assert row["samples"] == 120 and row["loss_after"] == 0.5 and row["clients"] == [4, 0, 2]


def test_a_round_without_a_valid_reply_keeps_the_totals_at_the_end():
    row = MetricsRow(2, **round_fields({**RECORD, "replies": 0, "updated": False,
                                        "diverged": "not finite"}), samples=7, seconds=0.2)
    assert list(row.as_dict()) == ["round", "clients", "replies", "failures", "failures_by_kind",
                                   "rejected", "updated", "diverged", "samples", "bytes_up",
                                   "bytes_down", "seconds"]
    assert list(MetricsRow(0, eval={"x": 1.0}).as_dict()) == [
        "round", "eval", "samples", "bytes_up", "bytes_down", "seconds"]


def test_a_written_row_reads_back_as_the_same_row():
    row = trained_row()
    assert MetricsRow.from_dict(row.as_dict()) == row
    # metrics.jsonl writes NaN as null: it comes back as NaN, in its place
    back = MetricsRow.from_dict({**row.as_dict(), "loss_after": None})
    assert math.isnan(back.loss_after) and list(back.as_dict()) == list(row.as_dict())


def test_a_row_with_an_unknown_key_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"round 3: unknown key\(s\) 'partial'; a row holds round, "):
        MetricsRow.from_dict({"round": 3, "partial": True})
