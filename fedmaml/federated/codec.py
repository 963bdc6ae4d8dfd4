"""Tensors to and from Flower ``ArrayRecord`` s, in Flower's own format but without its per-array cost.

Flower stores each array as the bytes of ``numpy.save`` and reads it back with ``numpy.load``. Both
parse or format a header dict per array (``ast.literal_eval`` on load), which costs more than the
arithmetic of a small model's client step; with hundreds of clients per round it dominated the
in-process engine's overhead. Here the ``.npy`` header of each (dtype, shape) is built once and
cached, and decoding reuses the parsed header of every header it has seen, so both directions are a
``tobytes`` / ``frombuffer`` plus a lookup. The bytes are exactly ``numpy.save``'s, so Flower (and
any peer running Flower's own ``to_torch_state_dict``) reads them unchanged, and anything unusual
(Fortran order, other format versions, non-numpy arrays) goes through Flower's path.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedmaml.core.params import Params

_MAGIC_1_0 = b"\x93NUMPY\x01\x00"
_NUMPY_STYPE = "numpy.ndarray"
_CACHE_SIZE = 4096  # distinct (dtype, shape)s; a run has a handful
_HEADERS: dict[tuple[str, tuple[int, ...]], tuple[bytes, str]] = {}
_LAYOUTS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


def encode(params: Params) -> ArrayRecord:
    """An ArrayRecord holding ``params`` (moved to the CPU, detached)."""
    items = []
    for k, v in params.items():
        a = v.detach().cpu().contiguous().numpy()
        header, dtype = _header(a)
        # one copy: join reads the array's buffer (header + a.tobytes() would copy twice)
        items.append((k, _array(dtype, tuple(a.shape), b"".join((header, a.data)))))
    return _record(items)


def encode_rows(stacked: Params) -> list[ArrayRecord]:
    """One ArrayRecord per row of stacked tensors (``[n, ...]`` each), e.g. a cohort's updates:
    each tensor is converted and each header built once, not once per row."""
    columns = []
    for k, v in stacked.items():
        a = v.detach().cpu().contiguous().numpy()
        header, dtype = _header(a[0])
        columns.append((k, a, header, dtype, tuple(a.shape[1:])))
    return [_record([(k, _array(dtype, shape, b"".join((header, a[j].data))))
                     for k, a, header, dtype, shape in columns])
            for j in range(len(columns[0][1]) if columns else 0)]


def encode_joined(columns: Mapping[str, Sequence[np.ndarray]]) -> ArrayRecord:
    """An ArrayRecord whose array ``k`` is the arrays ``columns[k]`` (C-contiguous, one dtype and
    trailing shape) joined along their first axis, as :func:`encode` of their concatenation would
    hold it, in one copy: e.g. the stacked updates of several shards of a cohort."""
    items = []
    for k, parts in columns.items():
        first = parts[0]
        shape = (sum(len(p) for p in parts), *first.shape[1:])
        # np.empty: the header only reads dtype and shape (the pages are never touched)
        header, dtype = _header(np.empty(shape, dtype=first.dtype))
        items.append((k, _array(dtype, shape, b"".join((header, *(p.data for p in parts))))))
    return _record(items)


def decode(record: ArrayRecord) -> "OrderedDict[str, torch.Tensor]":
    """The tensors of an ArrayRecord, like ``record.to_torch_state_dict()``."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k, array in record.items():
        a, is_view = array_values(array)
        # copy a view: the message's bytes are immutable and must not back a live tensor
        out[k] = torch.from_numpy(a.copy() if is_view else a)
    return out


def npy_header(like: torch.Tensor) -> bytes:
    """The ``.npy`` header :func:`encode` writes for a tensor of ``like``'s dtype and shape."""
    return _header(like.detach().cpu().contiguous().numpy())[0]


def payload(array: Array, header: bytes, nbytes: int) -> memoryview | None:
    """The raw values of an array that was written with exactly ``header`` and holds ``nbytes`` of
    values (a view of the message's bytes, nothing parsed or copied); ``None`` for any other array,
    to be read with :func:`array_values`."""
    data = array.data
    if (array.stype == _NUMPY_STYPE and len(data) == len(header) + nbytes
            and data.startswith(header)):
        return memoryview(data)[len(header):]
    return None


def array_values(array: Array) -> tuple[np.ndarray, bool]:
    """One array's values in native byte order, and whether they are a read-only view of the
    message's bytes (a known layout: no parsing, no copy) rather than an array of their own."""
    data = array.data
    if array.stype == _NUMPY_STYPE and data[:8] == _MAGIC_1_0:
        offset = 10 + int.from_bytes(data[8:10], "little")
        layout = _LAYOUTS.get(data[:offset])
        if layout is not None:
            dtype, shape, count = layout
            if len(data) - offset == count * dtype.itemsize:
                return np.frombuffer(data, dtype, count, offset).reshape(shape), True
        a = array.numpy()
        if (a.flags.c_contiguous and a.dtype.isnative and not a.dtype.hasobject
                and len(_LAYOUTS) < _CACHE_SIZE):
            _LAYOUTS[data[:offset]] = (a.dtype, a.shape, a.size)
    else:
        a = array.numpy()
    if not a.dtype.isnative:  # torch holds native byte order only
        a = a.astype(a.dtype.newbyteorder("="))
    return a, False


# Flower's Array and ArrayRecord constructors type-check every argument and item (about 10 us per
# array, more than the copy itself). Our values are right by construction, so when this Flower
# version's objects are plain attribute holders (checked once below against objects built the
# public way) they are filled directly; otherwise the public constructors are used.
def _array_public(dtype: str, shape: tuple[int, ...], data: bytes) -> Array:
    return Array(dtype=dtype, shape=shape, stype=_NUMPY_STYPE, data=data)


def _record_public(items: list[tuple[str, Array]]) -> ArrayRecord:
    record = ArrayRecord()
    for k, array in items:
        record[k] = array
    return record


def _array_direct(dtype: str, shape: tuple[int, ...], data: bytes) -> Array:
    array = Array.__new__(Array)
    array.__dict__.update(_is_dirty=True, dtype=dtype, shape=shape, stype=_NUMPY_STYPE, data=data)
    return array


def _record_direct(items: list[tuple[str, Array]]) -> ArrayRecord:
    record = ArrayRecord()
    record.__dict__["_data"].update(items)
    record.__dict__["_is_dirty"] = True
    return record


def _direct_matches_public() -> bool:
    try:
        items = [("x", b"\x00"), ("y", b"\x01\x02")]
        direct = _record_direct([(k, _array_direct("uint8", (len(d),), d)) for k, d in items])
        public = _record_public([(k, _array_public("uint8", (len(d),), d)) for k, d in items])
        same = (direct.__dict__.keys() == public.__dict__.keys()
                and direct.__dict__["_data"].keys() == public.__dict__["_data"].keys()
                and all(direct[k].__dict__ == public[k].__dict__ for k, _ in items))
        return same and direct.object_id == public.object_id and direct == public
    except Exception:  # noqa: BLE001 - any surprise means: use the public constructors
        return False


_array, _record = ((_array_direct, _record_direct) if _direct_matches_public()
                   else (_array_public, _record_public))


def _header(a: np.ndarray) -> tuple[bytes, str]:
    key = (a.dtype.str, a.shape)
    cached = _HEADERS.get(key)
    if cached is None:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(a))
        cached = (buf.getvalue(), str(a.dtype))
        if len(_HEADERS) < _CACHE_SIZE:
            _HEADERS[key] = cached
    return cached
