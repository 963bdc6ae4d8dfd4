"""Injected client faults (``faults.*``): which clients fail, straggle or drop out in a round.

The decision is a pure function of ``(seed, client id, round)``: one uniform draw from the client's
own stream, cut at the three rates. So the server, the ClientApp, the vectorized engine and a batch
of runs (``[runs, clients]`` at once) agree on it without telling each other. What a fault does to
a reply (an error, a reply marked late) is the transport's part: fedmaml/federated/faults.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmaml.config import Config

KINDS = ("fail", "straggle", "dropout")
NONE, FAIL, STRAGGLE, DROPOUT = 0, 1, 2, 3  # codes of fault_codes: 0 none, then KINDS in order
_STREAM = 0xFA17  # keeps fault draws independent of every other (seed, client, round) stream


class InjectedFault(RuntimeError):
    """The failure ``faults.fail`` injects (an exception in the client, as a crash would be)."""


def fault_rates(cfg: Config) -> tuple[float, float, float]:
    f = cfg.faults
    return f.fail, f.straggle, f.dropout


def enabled(cfg: Config) -> bool:
    return any(fault_rates(cfg))


def fault_codes(rates: tuple[float, float, float], seeds: Any, cids: Any, server_round: int
                ) -> np.ndarray:
    """The fault code (:data:`NONE`, :data:`FAIL`, :data:`STRAGGLE`, :data:`DROPOUT`) of every
    client of ``cids`` (any shape; ``seeds`` broadcasts against it, e.g. ``[R, 1]`` for a batch of
    runs ``[R, C]``) in ``server_round``."""
    cids = np.asarray(cids, dtype=np.int64)
    seeds = np.broadcast_to(np.asarray(seeds, dtype=np.int64), cids.shape)
    fail, straggle, dropout = rates
    if not (fail or straggle or dropout):
        return np.zeros(cids.shape, dtype=np.int8)
    u = np.asarray([np.random.default_rng([int(s), int(c), server_round, _STREAM]).random()
                    for s, c in zip(seeds.reshape(-1), cids.reshape(-1))]).reshape(cids.shape)
    bounds = np.cumsum([fail, straggle, dropout])
    return np.where(u < bounds[2], np.searchsorted(bounds, u, side="right") + 1, NONE
                    ).astype(np.int8)


def client_fault(cfg: Config, cid: int, server_round: int) -> str | None:
    """``fail``, ``straggle``, ``dropout`` or ``None`` for client ``cid`` in ``server_round``."""
    rates = fault_rates(cfg)
    if not any(rates):  # the usual run: no fault to draw (fault_codes would give NONE)
        return None
    code = int(fault_codes(rates, cfg.seed, [cid], server_round)[0])
    return KINDS[code - 1] if code else None


def injected(cfg: Config, cids: Any, server_round: int) -> dict[str, int]:
    """How many of the round's sampled clients get each fault (what the server should count)."""
    return injected_counts(fault_codes(fault_rates(cfg), cfg.seed, [list(cids)], server_round))[0]


def injected_counts(codes: np.ndarray) -> list[dict[str, int]]:
    """Per row of fault codes ``[R, C]`` (a run's clients), how many clients get each fault."""
    # one count per kind over all rows at once: a batch asks every round, for each of its runs
    per_kind = [(np.asarray(codes) == j + 1).sum(1).tolist() for j in range(len(KINDS))]
    return [dict(zip(KINDS, counts)) for counts in zip(*per_kind)]


def marker(kind: str) -> str:
    """What the reason of a failure injected as ``kind`` (one of :data:`KINDS`) says: its key."""
    return f"(faults.{kind})"


def is_injected(reason: str) -> bool:
    """Whether a failure's reason is that of an injected fault (its :func:`marker`), which the
    server counts like any failure but need not warn about: it was asked for."""
    return any(marker(kind) in reason for kind in KINDS)


def fail(cid: int, server_round: int) -> InjectedFault:
    return InjectedFault(f"injected failure {marker('fail')} of client {cid} in round "
                         f"{server_round}")


def failure_kind(e: BaseException) -> str:
    """The failure kind a client's exception reports (``kind`` attribute; ``error`` otherwise)."""
    kind = getattr(e, "kind", None)
    return kind if isinstance(kind, str) else "error"


def failure_of(cid: int, e: BaseException) -> tuple[int, str, str]:
    """``(client id, kind, reason)`` of a client that raised ``e``."""
    return cid, failure_kind(e), f"{type(e).__name__}: {e}"


@dataclass
class CohortFaults:
    """A cohort's injected faults: who trains (stragglers included: their memory moves), the
    stragglers, and the failures ``(client id, kind, reason)`` of those that do not train."""

    training: list[int]
    late: list[int] = field(default_factory=list)
    failures: list[tuple[int, str, str]] = field(default_factory=list)


def cohort_faults(cfg: Config, cids: list[int], server_round: int) -> CohortFaults:
    """Split a cohort by its injected faults: a failure is an error (the client raised), a dropout
    a timeout (it sent nothing in time), as a run alone's server counts them."""
    if not enabled(cfg):
        return CohortFaults(list(cids))
    out = CohortFaults([])
    for cid, code in zip(cids, fault_codes(fault_rates(cfg), cfg.seed, cids, server_round).tolist()):
        if code == FAIL:
            out.failures.append(failure_of(cid, fail(cid, server_round)))
            continue
        if code == DROPOUT:
            out.failures.append((cid, "timeout", f"client {cid} dropped out {marker('dropout')}"))
            continue
        if code == STRAGGLE:
            out.late.append(cid)
        out.training.append(cid)
    return out


def trains(codes: np.ndarray) -> np.ndarray:
    """Which clients train (their memory moves): all but injected failures and dropouts."""
    return (codes != FAIL) & (codes != DROPOUT)


def arrives(codes: np.ndarray, late: np.ndarray) -> np.ndarray:
    """Which clients' updates reach the server in time: those that train, are no injected
    stragglers and are not ``late`` (past the round deadline)."""
    return trains(codes) & (codes != STRAGGLE) & ~np.asarray(late, dtype=bool)
