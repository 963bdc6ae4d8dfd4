"""Injected client faults, for studying robustness in simulation (``faults.*`` config keys).

Which fault, if any, a sampled client has in a training round is a pure function of
``(seed, client id, round)`` (:func:`client_fault`), so the server, the ClientApp and the vectorized
engine agree on it without telling each other, and a run stays a function of its config and seed:

* ``fail``: the client raises before it trains (an error reply; its memory is unchanged);
* ``straggle``: the client trains (its memory moves, as on a real device) but its reply comes after
  the round timeout, so the server does not use it;
* ``dropout``: the client is away for the whole round: it does no work and sends nothing in time.

The lateness of stragglers and dropouts is modelled, on every engine: the reply carries
:data:`LATE`, and :func:`arrived` (called by the strategy's ``exchange``) treats it as arriving after
the deadline. Nobody sleeps, so a study of thousands of rounds runs at full speed and the server
counts exactly the injected timeouts. (Really sleeping in a Ray actor would also hold up the
clients queued behind it on that actor, which would then be late too.) Both need
``federated.round_timeout > 0``: without a deadline a real server waits for ever for a dropout.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict

from fedmaml.config.schema import Config
from fedmaml.federated import records as R

KINDS = ("fail", "straggle", "dropout")
#: Metric of a reply that the fault model says arrives after the round's deadline.
LATE = "injected-late"
_STREAM = 0xFA17  # keeps fault draws independent of every other (seed, client, round) stream


class InjectedFault(RuntimeError):
    """The failure ``faults.fail`` injects (an exception in the client, as a crash would be)."""


def fault_rates(cfg: Config) -> tuple[float, float, float]:
    f = cfg.faults
    return f.fail, f.straggle, f.dropout


def client_fault(cfg: Config, cid: int, server_round: int) -> str | None:
    """``fail``, ``straggle``, ``dropout`` or ``None`` for client ``cid`` in ``server_round``: one
    uniform draw from the client's own (seed, id, round) stream, cut at the three rates."""
    fail, straggle, dropout = fault_rates(cfg)
    if not (fail or straggle or dropout):
        return None
    u = np.random.default_rng([cfg.seed, cid, server_round, _STREAM]).random()
    for kind, upto in (("fail", fail), ("straggle", fail + straggle),
                       ("dropout", fail + straggle + dropout)):
        if u < upto:
            return kind
    return None


def injected(cfg: Config, cids: Iterable[int], server_round: int) -> dict[str, int]:
    """How many of the round's sampled clients get each fault (what the server should count)."""
    counts = {k: 0 for k in KINDS}
    for cid in cids:
        kind = client_fault(cfg, cid, server_round)
        if kind is not None:
            counts[kind] += 1
    return counts


def enabled(cfg: Config) -> bool:
    return any(fault_rates(cfg))


def fail(cid: int, server_round: int) -> InjectedFault:
    return InjectedFault(f"injected failure (faults.fail) of client {cid} in round {server_round}")


def dropout_reply(msg: Message, cid: int) -> Message:
    """What a dropped-out client "sends": nothing in time (a reply the server treats as late)."""
    return Message(RecordDict({R.METRICS: MetricRecord({R.PARTITION: cid, LATE: 1})}),
                   reply_to=msg)


def mark_late(reply: Message) -> Message:
    """A straggler's reply: complete, but after the deadline."""
    reply.content[R.METRICS][LATE] = 1
    return reply


def arrived(replies: Iterable[Message]) -> list[Message]:
    """The replies that arrived before the deadline (those the fault model made late dropped)."""
    return [m for m in replies if not _late(m)]


def _late(msg: Message) -> bool:
    if msg.has_error() or not msg.has_content():
        return False
    metrics = msg.content.get(R.METRICS)
    return isinstance(metrics, MetricRecord) and bool(metrics.get(LATE, 0))
