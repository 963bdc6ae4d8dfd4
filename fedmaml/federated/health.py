"""Run health: what became of a run (its status) and the totals its summary reports.

A run ends with one status:

* ``completed``: every round ran;
* ``diverged``: the aggregated update, every update that arrived in a round, or an evaluation loss
  was NaN or infinite. The run stops at once; ``model.pt`` keeps the last good model;
* ``failed``: ``federated.max_failed_rounds`` consecutive rounds without one valid reply (every
  client erred, timed out or sent something malformed), or a run whose rounds all ended without
  one, whatever ``max_failed_rounds`` is: it trained nothing, so it did not complete;
* ``interrupted``: stopped by SIGINT/SIGTERM (or a stop request) after a round; the run directory
  then holds a checkpoint to resume from (fedmaml/federated/checkpoint.py).

:class:`RunHealth` reads the per-round rows the strategy writes (``metrics.jsonl``), so the status
logic stays out of the per-client parsing: the strategy only counts each round's outcomes
(:func:`round_outcome`), whatever path produced them (per-client replies or a cohort).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Why a sampled client's reply was not used. ``rejected`` updates (well-formed but NaN/inf) are
#: counted apart: they say that training diverged, not that a client or the transport failed.
FAILURE_KINDS = ("error", "timeout", "malformed")
#: Evaluation keys whose non-finite value means the model diverged.
_LOSS_KEYS = ("seen.loss.mean", "unseen.loss.mean", "seen.memory-loss.mean")


def round_outcome(kinds: Iterable[str], missing: int) -> dict[str, Any]:
    """A round's failure counts from the kind of every reply that was not used (``error``,
    ``malformed`` or ``rejected``) and the number of sampled clients that did not reply in time:
    ``failures`` (all of them, as before), ``failures_by_kind`` and ``rejected``."""
    by_kind = {k: 0 for k in FAILURE_KINDS}
    rejected = 0
    for kind in kinds:
        if kind == "rejected":
            rejected += 1
        else:
            by_kind[kind] += 1
    by_kind["timeout"] += max(missing, 0)
    return {"failures": sum(by_kind.values()) + rejected, "failures_by_kind": by_kind,
            "rejected": rejected}


class RunStopped(Exception):
    """The run stops before its last round: ``status`` and one line saying why and what to try.
    ``distrust_w``: the current ``w`` itself made things diverge (its evaluation, or every client's
    update from it, was not finite), so the result is the model before the last applied update."""

    def __init__(self, status: str, server_round: int, message: str,
                 distrust_w: bool = False) -> None:
        super().__init__(message)
        self.status, self.round, self.message = status, server_round, message
        self.distrust_w = distrust_w


@dataclass
class RunHealth:
    """Totals over the rounds seen so far, and the rules that stop a run."""

    max_failed_rounds: int
    hint: str = "a smaller algorithm.eta or federated.server_lr"
    #: the run's last round (``federated.rounds``): a run that reaches it without a single valid
    #: reply failed; 0: not known, no such check
    rounds: int = 0
    replies: int = 0
    failures: dict[str, int] = field(default_factory=lambda: {k: 0 for k in FAILURE_KINDS})
    rejected: int = 0
    rounds_completed: int = 0
    failed_in_a_row: int = 0
    #: clients whose corrupt memory file was replaced by a fresh memory (memory-reset=true), and
    #: how many times that happened
    memory_resets: int = 0
    memory_reset_clients: set[int] = field(default_factory=set)

    def observe(self, row: Mapping[str, Any], last_error: str = "") -> None:
        """Account for one metrics row; raise :class:`RunStopped` when the run must stop."""
        r = int(row["round"])
        if r > 0:
            self.replies += int(row.get("replies", 0))
            for kind, n in row.get("failures_by_kind", {}).items():
                self.failures[kind] = self.failures.get(kind, 0) + int(n)
            self.rejected += int(row.get("rejected", 0))
            self.memory_resets += int(row.get("memory_resets", 0))
            self.memory_reset_clients.update(int(c) for c in row.get("memory_reset_clients", []))
            if row.get("diverged"):
                raise RunStopped("diverged", r, f"run diverged at round {r}: {row['diverged']}; "
                                 f"try {self.hint}")
            if int(row.get("replies", 0)) == 0 and int(row.get("rejected", 0)) > 0 and not any(
                    row.get("failures_by_kind", {}).get(k) for k in ("error", "malformed")):
                raise RunStopped("diverged", r, f"run diverged at round {r}: every update that "
                                 f"arrived ({row['rejected']}) holds NaN or infinite values; try "
                                 f"{self.hint}", distrust_w=True)
            if row.get("clients", True):  # a round that asked nobody (Poisson) did not fail
                self.failed_in_a_row = (self.failed_in_a_row + 1 if int(row.get("replies", 0)) == 0
                                        else 0)
        bad = [k for k in _LOSS_KEYS if k in row.get("eval", {})
               and not _finite(row["eval"][k])]
        if bad:
            raise RunStopped("diverged", r, f"run diverged at round {r}: the evaluation loss "
                             f"({', '.join(bad)}) is not finite; try {self.hint}",
                             distrust_w=True)
        self.rounds_completed = r
        why = f" (last error: {last_error})" if last_error else ""
        if self.failed_in_a_row >= self.max_failed_rounds:
            raise RunStopped("failed", r, f"run failed at round {r}: no valid reply for "
                             f"{self.failed_in_a_row} consecutive rounds{why}; fix the clients' "
                             "problem, or raise federated.max_failed_rounds or "
                             "federated.round_timeout")
        if self.rounds and r >= self.rounds and self.replies == 0:
            raise RunStopped("failed", r, f"run failed: none of its {r} rounds got a valid reply, "
                             f"so nothing was trained{why}; fix the clients' problem (fewer rounds "
                             f"than federated.max_failed_rounds = {self.max_failed_rounds} do not "
                             "stop a run early, but such a run cannot complete)")

    def totals(self) -> dict[str, Any]:
        """The summary's share: total valid replies, failures by kind, rejected updates, rounds, and
        the memory resets (count and client ids)."""
        return {"replies": self.replies, "failures": dict(self.failures),
                "rejected_updates": self.rejected, "rounds_completed": self.rounds_completed,
                "memory_resets": self.memory_resets,
                "memory_reset_clients": sorted(self.memory_reset_clients)}

    def state(self) -> dict[str, Any]:
        """Everything needed to continue counting after a resume."""
        return {"replies": self.replies, "failures": dict(self.failures), "rejected": self.rejected,
                "rounds_completed": self.rounds_completed, "failed_in_a_row": self.failed_in_a_row,
                "memory_resets": self.memory_resets,
                "memory_reset_clients": sorted(self.memory_reset_clients)}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.replies, self.rejected = int(state["replies"]), int(state["rejected"])
        self.failures = {k: int(v) for k, v in state["failures"].items()}
        self.rounds_completed = int(state["rounds_completed"])
        self.failed_in_a_row = int(state["failed_in_a_row"])
        # checkpoints written before memory resets were counted have none
        self.memory_resets = int(state.get("memory_resets", 0))
        self.memory_reset_clients = {int(c) for c in state.get("memory_reset_clients", [])}


def _finite(value: Any) -> bool:
    # metrics.jsonl writes NaN/inf as null; rows seen here still hold the floats
    return value is not None and math.isfinite(float(value))


def run_status(summary: Mapping[str, Any] | None) -> str | None:
    """The status a ``summary.json`` records (runs written before statuses existed completed)."""
    if summary is None:
        return None
    return str(summary.get("status", "completed"))
