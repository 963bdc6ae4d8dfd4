"""Injected client faults, for studying robustness in simulation (``faults.*`` config keys).

Which fault, if any, a sampled client has in a training round is a pure function of
``(seed, client id, round)`` (:func:`fedmaml.client.faults.client_fault`, the client library's),
so the server, the ClientApp, the vectorized engine and a batch of runs agree on it without telling
each other, and a run stays a function of its config and seed. The faults (this module holds what
they do to messages):

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

from flwr.app import Message, MetricRecord, RecordDict

# The decision is the client library's (transport-free); these names stay importable from here.
from fedmaml.client.faults import (KINDS, client_fault, enabled, fail, injected,  # noqa: F401
                                   is_injected)
from fedmaml.federated import records as R

#: Metric of a reply that the fault model says arrives after the round's deadline.
LATE = "injected-late"


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
