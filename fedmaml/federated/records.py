"""What travels in Flower messages, and the checks applied to everything a peer sends.

Train instruction: ``arrays`` (the meta-model ``w_r``) and ``config`` (``server-round``, ``eta``).
Train reply: ``arrays`` (the update ``delta = w - w_r``) and ``metrics`` (``num-examples``, losses,
timing). Evaluate instruction: ``arrays`` and ``config``; reply: ``metrics`` only. Query (partition
discovery): the reply's ``metrics`` carry the node's ``partition-id``. Memories never appear here.

Cohort train instruction (to a grid that takes cohorts, the vectorized engine): one message for
many clients, ``arrays`` (``w_r`` once) and ``config`` with ``cohort`` (the clients' ids). Its
reply: ``arrays`` (the updates of the clients that trained, stacked ``[n, ...]``), ``metrics``
(per-client lists, ``partition-id`` naming each row) and ``failures`` (``partition-id``, ``kind``
and ``reason`` of every client that did not train: ``error``, ``timeout``, ``malformed``).

Cohort evaluate instruction: ``arrays`` and ``config`` with ``cohort`` (the panel's ids, seen and
unseen). Its reply: ``metrics`` (every key of a client's evaluation as a per-client list,
``partition-id`` naming each row), ``absent`` (per key, the ids of the clients whose evaluation
has no such metric, e.g. memory metrics of a client without a memory) and ``failures`` as above.

Summed cohort train reply (the sharded engine's, when the server round takes the plain mean): as a
cohort train reply, but instead of ``arrays`` the ``part-sums`` (per parameter ``[P, ...]``: part
``p``'s weighted sum of its accepted updates, server_round.part_sum) and ``parts`` (``part``: per
metrics row the part that holds its update, -1 for none; ``rejected``: per row why its update was
left out for not being finite, empty otherwise; ``weighting``: the weights the sums used).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

# The client library's metric names (transport-free) are the wire's too.
from fedmaml.client.metrics import MEMORY_RESET, NUM_EXAMPLES, PARTITION  # noqa: F401
from fedmaml.core.params import Params, finite_rows
from fedmaml.errors import MessageError
from fedmaml.federated import codec

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
ROUND, ETA = "server-round", "eta"
COHORT, FAILURES, KIND, REASON = "cohort", "failures", "kind", "reason"
ABSENT = "absent"
PART_SUMS, PARTS, PART, REJECTED, WEIGHTING = "part-sums", "parts", "part", "rejected", "weighting"
#: In a train reply's metrics, ``MEMORY_RESET``: 1 when the client's memory file was corrupt and was
#: moved aside for a fresh memory this round (a device with ``memory-reset=true``); absent otherwise.


def to_record(params: Params) -> ArrayRecord:
    return codec.encode(params)  # Flower's format, without its per-array header cost


#: The records :func:`kept_record` made last, by ``id``: the record, what identifies it unchanged
#: (its arrays and their bytes objects) and a copy of its tensors.
_kept: dict[int, tuple[ArrayRecord, tuple, Params]] = {}
_KEEP = 2  # the model of this round and of the one before


def kept_record(params: Params) -> ArrayRecord:
    """:func:`to_record` of the server's model ``w_r``, keeping a copy of its tensors: an
    in-process engine hands this very record to its clients in the next round's instruction, and
    :func:`kept_tensors` then gives the tensors back without decoding and checking the bytes again
    (about as much work as a small model's client step). Any other process decodes the record."""
    record = codec.encode(params)
    if len(_kept) >= _KEEP:
        del _kept[next(iter(_kept))]  # the oldest
    _kept[id(record)] = (record, _identity(record),
                         {k: v.detach().cpu().clone() for k, v in params.items()})
    return record


def kept_tensors(record: Any) -> Params | None:
    """The tensors of ``record`` if :func:`kept_record` made it in this process and it is unchanged
    (the same arrays holding the same bytes objects), else ``None``. They are shared by every
    reader: not to be modified in place (a client update never modifies its inputs)."""
    kept = _kept.get(id(record))
    if kept is None or kept[0] is not record:
        return None
    now = _identity(record)
    if len(now) != len(kept[1]) or not all(x is y for x, y in zip(now, kept[1])):
        return None
    return kept[2]


def _identity(record: ArrayRecord) -> tuple:
    arrays = list(record.values())
    return (*arrays, *(a.data for a in arrays))


def from_record(record: ArrayRecord, like: Params, what: str) -> Params:
    """Parameters from a peer's record, checked against the expected names and shapes."""
    tensors = codec.decode(record)
    _check_names(list(tensors), like, what)
    for k, v in tensors.items():
        _check_shape(k, tuple(v.shape), like, what)
        if not np.isfinite(v.numpy()).all():  # numpy: ~4x faster than torch on small arrays
            raise MessageError(_not_finite(k, what))
    return {k: v if v.dtype == like[k].dtype else v.to(like[k].dtype) for k, v in tensors.items()}


def stack_from_records(records: Sequence[ArrayRecord], like: Params, whats: Sequence[str]
                       ) -> tuple[Params, list[str | None]]:
    """Many peers' records at once (a round's updates): row ``j`` of each returned tensor holds
    ``records[j]``'s parameter, in ``like``'s dtype, and ``errors[j]`` is ``None`` or why the record
    fails :func:`from_record`'s checks (its row is then zero).

    Per record and tensor, checks and copies cost more than aggregating: here the arrays in the
    layout our codec writes (every fedmaml peer's) are joined into each stack with one copy, and
    finiteness is tested once for the whole round; any other array is read as :func:`from_record`
    reads it."""
    n = len(records)
    errors: list[str | None] = [None] * n
    layouts = _layouts(like)
    parts: dict[str, list[Any]] = {k: [] for k in like}  # per parameter, each record's raw values
    others: list[tuple[int, str, torch.Tensor]] = []  # (row, parameter, tensor) read the long way
    for j, (record, what) in enumerate(zip(records, whats)):
        row: dict[str, Any] = {}
        read: list[tuple[int, str, torch.Tensor]] = []
        try:
            arrays = dict(record.items())
            _check_names(list(arrays), like, what)
            for k, (header, nbytes) in layouts.items():
                row[k] = codec.payload(arrays[k], header, nbytes)
                if row[k] is None:
                    values, _ = codec.array_values(arrays[k])
                    _check_shape(k, values.shape, like, what)
                    # np.array: a writable copy (the values may be a view of the message's bytes)
                    read.append((j, k, torch.from_numpy(np.array(values)).to(like[k].dtype)))
        except (MessageError, TypeError, ValueError) as e:  # undecodable bytes are malformed too
            errors[j] = str(e) if isinstance(e, MessageError) else f"{what}: {e}"
            row, read = {}, []
        others += read
        for k, (_, nbytes) in layouts.items():
            parts[k].append(row.get(k) or bytes(nbytes))  # zeros hold the place of other rows
    stacked = {k: _joined(parts[k], n, v) for k, v in like.items()}
    for j, k, tensor in others:
        stacked[k][j] = tensor
    _reject_non_finite(stacked, errors, whats)
    return stacked, errors


def _reject_non_finite(stacked: Params, errors: list[str | None], whats: Sequence[str]) -> None:
    """Name every row of ``stacked`` that holds a NaN or an infinity in ``errors`` (unless it has
    an error already), and zero the rows with errors.

    The rows are found as the server round finds them (:func:`~fedmaml.core.params.finite_rows`:
    one sum per parameter and row, element by element only when a sum is not
    finite); only a row that is not finite is searched for the parameter to name."""
    if errors:
        for j in torch.nonzero(~finite_rows(stacked, 1)).flatten().tolist():
            if errors[j] is None:
                key = next(k for k, v in stacked.items() if not bool(torch.isfinite(v[j]).all()))
                errors[j] = _not_finite(key, whats[j])
    bad = [j for j, e in enumerate(errors) if e is not None]
    if bad:
        for v in stacked.values():
            v[bad] = 0


def stack_from_cohort(record: ArrayRecord, like: Params, whats: Sequence[str]
                      ) -> tuple[Params, list[str | None]]:
    """A cohort reply's stacked updates (``[n, *shape]`` per parameter, row ``j`` is ``whats[j]``),
    checked like :func:`from_record` (names, shapes; a record that fails is a ``MessageError``), and
    per row ``None`` or why the row is not finite (its row is then zero), as
    :func:`stack_from_records`."""
    stacked = stacked_from(record, like, len(whats), ARRAYS)
    errors: list[str | None] = [None] * len(whats)
    _reject_non_finite(stacked, errors, whats)
    return stacked, errors


def stacked_from(record: ArrayRecord, like: Params, n: int | None, key: str) -> Params:
    """A cohort reply's record ``key`` of ``n`` stacked rows (``[n, *shape]`` per parameter, in
    ``like``'s dtypes; ``n=None``: as many as the first parameter has); names and shapes checked
    (a ``MessageError`` when they differ)."""
    what = "cohort reply"
    if not isinstance(record, ArrayRecord):
        raise TypeError(f"{what}'s {key!r} is a {type(record).__name__}, not an ArrayRecord")
    tensors = codec.decode(record)
    _check_names(list(tensors), like, what)
    if n is None:
        n = next(iter(tensors.values())).shape[0] if tensors else 0
    stacked = {}
    for k, v in tensors.items():
        if tuple(v.shape) != (n, *like[k].shape):
            raise MessageError(f"{what}: parameter {k!r} has shape {list(v.shape)}, expected "
                               f"{[n, *like[k].shape]}")
        stacked[k] = v if v.dtype == like[k].dtype else v.to(like[k].dtype)
    return stacked


def _joined(parts: list[Any], n: int, like: torch.Tensor) -> torch.Tensor:
    """``n`` rows of ``like``'s shape and dtype from their raw bytes, in one copy."""
    buffer = bytearray().join(parts)
    if not buffer:  # no rows, or tensors with no elements: frombuffer refuses empty buffers
        return torch.zeros((n, *like.shape), dtype=like.dtype)
    return torch.frombuffer(buffer, dtype=like.dtype).reshape(n, *like.shape)


_LAYOUTS: dict[tuple, dict[str, tuple[bytes, int]]] = {}


def _layouts(like: Params) -> dict[str, tuple[bytes, int]]:
    """Per parameter: the header our codec writes for it and the byte size of its values."""
    key = tuple((k, v.dtype, tuple(v.shape)) for k, v in like.items())
    layouts = _LAYOUTS.get(key)
    if layouts is None:
        layouts = {k: (codec.npy_header(v), v.numel() * v.element_size()) for k, v in like.items()}
        if len(_LAYOUTS) < 64:  # a run has one model; bounded for processes that see many
            _LAYOUTS[key] = layouts
    return layouts


def _check_names(names: list[str], like: Params, what: str) -> None:
    if names != list(like):
        missing = sorted(set(like) - set(names))
        extra = sorted(set(names) - set(like))
        raise MessageError(f"{what}: parameter names differ from the model's "
                           f"(missing {missing}, unexpected {extra})")


def _check_shape(k: str, shape: tuple[int, ...], like: Params, what: str) -> None:
    if shape != tuple(like[k].shape):
        raise MessageError(f"{what}: parameter {k!r} has shape {list(shape)}, "
                           f"expected {list(like[k].shape)}")


class NonFinite(str):
    """An error of :func:`stack_from_records` saying that a well-formed update holds NaN or
    infinite values (training diverged), as opposed to a malformed one."""


def _not_finite(k: str, what: str) -> NonFinite:
    return NonFinite(f"{what}: parameter {k!r} contains NaN or infinite values")


def failure_record(failures: Sequence[tuple[int, str, str]]) -> ConfigRecord:
    """A cohort reply's ``failures``: the ``(client id, kind, reason)`` of the clients left out."""
    return ConfigRecord({PARTITION: [int(f[0]) for f in failures], KIND: [f[1] for f in failures],
                         REASON: [f[2] for f in failures]})


def failures_from(record: Any) -> list[tuple[int, str, str]]:
    """The failures a cohort reply's ``failures`` record lists (``ValueError`` if lists differ in
    length)."""
    return list(zip([int(c) for c in record[PARTITION]], [str(k) for k in record[KIND]],
                    [str(r) for r in record[REASON]], strict=True))


def metric_columns(rows: Sequence[dict[str, Any]]) -> tuple[MetricRecord, ConfigRecord]:
    """Per-client metric dicts as a cohort reply's ``metrics`` (one list per key, row ``j`` is
    ``rows[j]``) and ``absent`` (per key, the ``partition-id`` of the rows without it, whose place
    holds NaN, or 0 in a list of integers)."""
    keys = list(dict.fromkeys([PARTITION, *(k for row in rows for k in row)]))
    columns: dict[str, Any] = {}
    absent: dict[str, list[int]] = {}
    for k in keys:
        present = [row[k] for row in rows if k in row]
        whole = all(isinstance(v, int) and not isinstance(v, bool) for v in present)
        fill = 0 if whole else math.nan
        columns[k] = [(int(row[k]) if whole else float(row[k])) if k in row else fill
                      for row in rows]
        if len(present) < len(rows):
            absent[k] = [int(row[PARTITION]) for row in rows if k not in row]
    return MetricRecord(columns), ConfigRecord(absent)


def metric_rows(metrics: Any, absent: Any = None) -> list[dict[str, Any]]:
    """The per-client metric dicts a cohort reply's ``metrics`` and ``absent`` carry (the inverse of
    :func:`metric_columns`); ``ValueError`` if a list's length differs from ``partition-id``'s."""
    ids = [int(c) for c in metrics[PARTITION]]
    columns = {k: list(v) for k, v in metrics.items()}
    if any(len(v) != len(ids) for v in columns.values()):
        raise ValueError("per-client metric lists differ in length from partition-id")
    missing = {k: {int(c) for c in v} for k, v in absent.items()} if absent is not None else {}
    return [{k: v[j] for k, v in columns.items() if cid not in missing.get(k, ())}
            for j, cid in enumerate(ids)]


def cohort_ids(message: Message) -> Any:
    """The client ids a cohort instruction addresses (``None``: a message to one client)."""
    config = message.content.get(CONFIG) if message.has_content() else None
    return None if config is None else config.get(COHORT)


def instruction_bytes(message: Message) -> int:
    """Array bytes of an instruction, counted per client: a cohort instruction carries ``w_r`` once
    for all its clients, which per-client messages would each have carried."""
    cohort = cohort_ids(message)
    return message_bytes(message) * (len(cohort) if cohort else 1)


def reply_bytes(message: Message, like: Params) -> int:
    """Array bytes of a train reply, counted as per-client replies would carry them: a cohort
    reply's stacked rows each as a record of their own (``like``'s names, headers and sizes)."""
    if not message.has_content() or FAILURES not in message.content:
        return message_bytes(message)
    if PARTS in message.content:  # summed by part: each metrics row had its update
        return len(message.content[METRICS].get(PARTITION, [])) * row_bytes(like)
    record = message.content.get(ARRAYS)
    if not isinstance(record, ArrayRecord) or not len(record):
        return 0
    first = next(iter(record.values()))
    rows = first.shape[0] if first.shape else 0
    return rows * row_bytes(like)


def row_bytes(like: Params) -> int:
    """Array bytes of one client's update as its own record (names, headers and values)."""
    return sum(len(k) + len(header) + nbytes for k, (header, nbytes) in _layouts(like).items())


def message_bytes(message: Message) -> int:
    """Bytes of the arrays a message carries (the payload that dominates communication)."""
    if not message.has_content():
        return 0
    # not content.array_records: that builds a filtered copy of the RecordDict on every call
    return sum(r.count_bytes() for r in message.content.values() if isinstance(r, ArrayRecord))
