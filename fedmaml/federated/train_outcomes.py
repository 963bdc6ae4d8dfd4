"""A round's train outcomes as columns, whichever messages carried them (fedmaml/federated/strategy.py
accounts for them).

Each client's train round comes to an update with its example count and metrics, or a failure
``(kind, why)``. Per-client replies (the ClientApp, Ray engine, devices) and cohort replies (the
vectorized and sharded engines: a stack of rows, or part sums) both become one :class:`Outcomes`:
per outcome, in arrival order, the client's id, its example count, where its update is (a row of
the round's stacks joined, or a part of its part sums joined) and the metrics the server reads, as
NumPy columns; the failures are listed by position. :func:`settle` decides which outcomes the round
uses, with the same rules and messages for every engine. A cohort of thousands of clients costs the
server a few array operations, not a Python object per client (docs/performance.md, "The sharded
engine").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmaml.federated import records as R
from fedmaml.federated.health import FAILURE_KINDS

TRAIN_METRICS = ("loss-before", "loss-after")
#: The metrics of a train reply that the server reads (the others are carried, not used).
READ = (*TRAIN_METRICS, "samples", "train-seconds", R.MEMORY_RESET)
#: A failed outcome: its kind (health.round_outcome counts them) and why, as logged.
Failure = tuple[str, str]


@dataclass
class Outcomes:
    """Per-client train outcomes, row ``i`` one outcome, in arrival order.

    ``cids``: the client's id (-1 when the reply did not say, or its failure names it); ``counts``:
    its example count; ``rows``: the row of its update in the round's stacks joined, ``parts``: the
    part holding it among the round's part sums joined (-1: none); ``failures``: by row, the
    outcomes that failed; ``metrics``: per key of :data:`READ`, the rows' values (0 where absent),
    ``present``: which rows have the key."""

    cids: np.ndarray
    counts: np.ndarray
    rows: np.ndarray
    parts: np.ndarray
    failures: dict[int, Failure]
    metrics: dict[str, np.ndarray]
    present: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.cids)


def _outcomes(cids: np.ndarray, counts: np.ndarray, rows: np.ndarray, parts: np.ndarray,
              failures: dict[int, Failure], metrics: Mapping[str, np.ndarray] = {},  # noqa: B006
              present: Mapping[str, np.ndarray] = {}) -> Outcomes:  # noqa: B006 - never changed
    """:class:`Outcomes` with every key of :data:`READ` (absent from rows not in ``metrics``)."""
    n = len(cids)
    return Outcomes(cids, counts, rows, parts, failures,
                    {k: metrics[k] if k in metrics else np.zeros(n, np.int64) for k in READ},
                    {k: present[k] if k in present else np.zeros(n, bool) for k in READ})


def failed(failures: Sequence[Failure]) -> Outcomes:
    """Outcomes that all failed (each failure names its client when the reply did)."""
    n = len(failures)
    none = np.full(n, -1, np.int64)
    return _outcomes(none, np.zeros(n, np.int64), none, none, dict(enumerate(failures)))


def joined(blocks: Sequence[Outcomes]) -> Outcomes:
    """Several messages' outcomes as one, in the order given."""
    if len(blocks) == 1:
        return blocks[0]
    if not blocks:
        return failed([])
    offsets = np.cumsum([0, *(len(b) for b in blocks)]).tolist()
    return Outcomes(*(np.concatenate([getattr(b, k) for b in blocks])
                      for k in ("cids", "counts", "rows", "parts")),
                    {at + i: f for at, b in zip(offsets, blocks) for i, f in b.failures.items()},
                    {k: np.concatenate([b.metrics[k] for b in blocks]) for k in READ},
                    {k: np.concatenate([b.present[k] for b in blocks]) for k in READ})


def update_failure(error: str) -> Failure:
    """An update that could not be used: ``rejected`` when it is well-formed but not finite
    (training diverged; health.py counts these apart), ``malformed`` otherwise."""
    kind = "rejected" if isinstance(error, R.NonFinite) else "malformed"
    return kind, f"{kind} update: {error}"


def from_clients(failures: Sequence[Failure],
                 parsed: Sequence[tuple[int, int, Mapping[str, Any]]],
                 errors: Sequence[str | None], first_row: int) -> Outcomes:
    """Per-client replies: the ``failures`` of those that could not be read, then per parsed
    reply ``(client id, example count, metrics)`` its update, row ``j`` of the stack starting at
    row ``first_row`` of the round's, or why it is not usable (``errors[j]``)."""
    n = len(parsed)
    fails = {j: update_failure(e) for j, e in enumerate(errors) if e is not None}
    rows = first_row + np.arange(n)
    rows[list(fails)] = -1
    block = _outcomes(
        np.array([p[0] for p in parsed], np.int64), np.array([p[1] for p in parsed], np.int64),
        rows, np.full(n, -1, np.int64), fails,
        {k: _column([p[2].get(k, 0) for p in parsed]) for k in READ},
        {k: np.array([k in p[2] for p in parsed], bool) for k in READ})
    return joined([failed(failures), block]) if failures else block


def from_cohort(content: Any, like: Mapping[str, Any], aggregation: str, stacks: list,
                sums: list) -> Outcomes:
    """A cohort reply (records.py): every client it names becomes an outcome, its rows in reply
    order, then the failures it lists. Its updates, a stack of rows (appended to ``stacks``) or
    the part sums (appended to ``sums``), are appended only when the whole reply is readable; one
    that is not raises (``KeyError``, ``TypeError``, ``ValueError``, ``MessageError``)."""
    ids, columns = R.metric_lists(content[R.METRICS])
    n = len(ids)
    counts = R.int_column(columns[R.NUM_EXAMPLES]) if n else np.zeros(0, np.int64)
    metrics: dict[str, np.ndarray] = {}
    if n:  # what every row must have, as numbers
        metrics = {key: _column(columns[key]) for key in ("samples", "train-seconds")}
    metrics.update({k: _column(columns[k]) for k in READ if k in columns and k not in metrics})
    listed = R.failures_from(content[R.FAILURES])
    if R.PARTS in content:
        summed, part_of, errors = _part_sums(content, n, like, aggregation)
    else:
        stacked, row_errors = R.stack_from_cohort(content[R.ARRAYS], like, R.UpdateNames(ids))
        errors = {j: e for j, e in enumerate(row_errors) if e is not None}
        part_of = None
    fails: dict[int, Failure] = {}
    bad = set(errors) | set(np.flatnonzero(counts <= 0).tolist())
    if part_of is not None:
        bad |= set(np.flatnonzero(part_of < 0).tolist())
    for j in sorted(bad):
        cid = int(ids[j])
        if j in errors:
            fails[j] = update_failure(errors[j])
        elif counts[j] <= 0:
            fails[j] = ("malformed", f"malformed reply: client {cid} reported {int(counts[j])} "
                                     "examples")
        else:
            fails[j] = ("malformed", f"malformed reply: no part holds client {cid}'s update")
    ok = np.ones(n, bool)
    ok[list(fails)] = False
    none = np.full(n, -1, np.int64)
    if part_of is None:
        rows, parts = np.where(ok, stacked_rows(stacks) + np.arange(n), -1), none
        stacks.append(stacked)
    else:
        rows, parts = none, np.where(ok, stacked_rows(sums) + part_of, -1)
        sums.append(summed)
    block = _outcomes(ids, counts, rows, parts, fails, metrics,
                      {k: np.ones(n, bool) for k in metrics})
    if not listed:
        return block
    labels = {"error": "client error", "malformed": "malformed reply"}
    return joined([block, failed([
        (kind if kind in FAILURE_KINDS else "error",  # a kind we do not know: it failed
         f"{labels.get(kind, kind)}: client {cid}: {reason}") for cid, kind, reason in listed])])


def _part_sums(content: Any, n: int, like: Mapping[str, Any], aggregation: str
               ) -> tuple[dict, np.ndarray, dict[int, str]]:
    """A reply summed by part (records.py): its part sums ``[P, ...]``, per metrics row its part
    (-1: none) and, by row, why an update was rejected."""
    parts = content[R.PARTS]
    weighting = str(parts[R.WEIGHTING])
    if weighting != aggregation:
        raise ValueError(f"the reply's parts are {weighting} sums, the run's "
                         f"federated.aggregation is {aggregation}")
    part_of = R.int_column(parts[R.PART])
    reasons = parts[R.REJECTED]
    # a record's list holds one type: a list of strings, all empty (the usual), is read at once
    texts = (reasons if isinstance(reasons, list) and reasons and type(reasons[0]) is str
             else [str(r) for r in reasons])
    rejected = {j: R.NonFinite(r) for j, r in enumerate(texts) if r} if any(texts) else {}
    if len(part_of) != n or len(reasons) != n:
        raise ValueError("the parts' lists differ in length from partition-id")
    summed = R.stacked_from(content[R.PART_SUMS], like, None, R.PART_SUMS)
    count = len(next(iter(summed.values()))) if summed else 0
    if n and part_of.max() >= count:
        raise ValueError(f"a row names part {part_of.max()} of {count} part sums")
    return summed, part_of, rejected


def stacked_rows(stacks: Sequence[Mapping[str, Any]]) -> int:
    """Rows (or parts) of ``stacks`` joined: where the next stack's rows start."""
    return sum(len(next(iter(s.values()))) if s else 0 for s in stacks)


def _column(values: Sequence[Any]) -> np.ndarray:
    """A metric's values as numbers: integers kept as integers (``samples`` is summed as such),
    anything else as ``float`` makes it (with ``float``'s own errors)."""
    a = np.asarray(values)
    if a.dtype.kind in "if" and a.ndim == 1:
        return a
    return np.array([float(v) for v in values], np.float64)


@dataclass
class Settled:
    """Which outcomes a round uses: ``valid`` (row indices, in client-id order), every other
    outcome's failure in the order found (``errors``), and how many sampled clients sent nothing
    (``missing``)."""

    valid: np.ndarray
    errors: list[Failure]
    missing: int


def settle(o: Outcomes, clients: Sequence[int]) -> Settled:
    """The round's valid outcomes: those that did not fail, from a sampled client, the first of
    that client's (a later one is a duplicate). A part sum holds every update its reply put in it:
    one the server cannot use (a client not sampled, or named twice) spoils the whole part, whose
    clients then fail too."""
    n = len(o)
    expected = _distinct(np.asarray(clients, dtype=np.int64))
    ok = np.ones(n, bool)
    ok[list(o.failures)] = False
    at = np.minimum(np.searchsorted(expected, o.cids), max(len(expected) - 1, 0))
    sampled = expected[at] == o.cids if len(expected) else np.zeros(n, bool)
    candidates = np.flatnonzero(ok & sampled)
    _, first = np.unique(o.cids[candidates], return_index=True)  # first of each client's
    used = np.zeros(n, bool)
    used[candidates[first]] = True
    unusable = ok & ~used  # not sampled, or a duplicate
    failures = dict(o.failures)
    for j in np.flatnonzero(unusable).tolist():
        failures[j] = ("malformed", f"unexpected reply from client {int(o.cids[j])} (not sampled, "
                                    "or a duplicate)")
    errors = [failures[j] for j in sorted(failures)]
    spoiled = np.unique(o.parts[unusable & (o.parts >= 0)])
    if len(spoiled):
        lost = used & np.isin(o.parts, spoiled)
        used &= ~lost
        errors += [("malformed", f"malformed reply: client {int(o.cids[j])}'s update is summed "
                                 "with one the server cannot use") for j in np.flatnonzero(lost)]
    valid = np.flatnonzero(used)
    # In client-id order: replies arrive in any order (Ray, devices), and the average's last bits
    # must not depend on it (a resumed run equals an uninterrupted one).
    valid = valid[np.argsort(o.cids[valid], kind="stable")]
    return Settled(valid, errors, max(len(expected) - n, 0))


def _distinct(ids: np.ndarray) -> np.ndarray:
    """``ids`` sorted, each once (``np.unique``'s result, by a sort: here several times faster
    than its hash table)."""
    ids = np.sort(ids)
    return ids[np.concatenate(([True], ids[1:] != ids[:-1]))] if len(ids) else ids


def train_metrics(o: Outcomes, valid: np.ndarray) -> dict[str, Any]:
    """The round's train metrics over its ``valid`` outcomes: the mean of each of
    :data:`TRAIN_METRICS` that every one has (``math.fsum``: exactly rounded, whatever the order),
    the ``samples`` drawn and the longest ``train-seconds``."""
    out: dict[str, Any] = {k: math.fsum(o.metrics[k][valid].tolist()) / len(valid)
                           for k in TRAIN_METRICS if o.present[k][valid].all()}
    samples = o.metrics["samples"][valid]
    out["samples"] = (int(samples.sum()) if samples.dtype.kind == "i"
                      else sum(int(s) for s in samples.tolist()))
    seconds = o.metrics["train-seconds"][valid].astype(np.float64)
    out["train-seconds-max"] = (float(seconds.max()) if not np.isnan(seconds).any()
                                else max(seconds.tolist()))  # max() of NaN: by its position
    return out
