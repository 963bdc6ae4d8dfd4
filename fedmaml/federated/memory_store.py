"""Where a client's memories live. The interface is the same in simulation and on devices: the
client library's :class:`~fedmaml.client.store.MemoryStore` (``load``/``save``), implemented here.

* :class:`ContextStateStore`: in the node's ``Context.state`` (simulation; lives as long as the run).
* :class:`FileStore`: a file in a directory on the device, written atomically (temp file, fsync,
  rename, directory fsync), so a kill or a power cut during a write leaves the previous memory intact;
  it survives SuperNode restarts. A file that cannot be read, or holds memories of another shape, is
  an error naming the file and the fix; it is replaced by a fresh memory only when the node was told
  so (``reset_corrupt``), and even then moved aside, not deleted.

A store holds one stacked ``Params`` (leading axis = the client's tasks). Memories never leave the
client: nothing here is ever put into a reply message.
"""

from __future__ import annotations

import hashlib
import io
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context

from fedmaml.atomic import PRIVATE, atomic_write_bytes
from fedmaml.client.store import MemoryStore
from fedmaml.core.params import Params
from fedmaml.errors import DataError
from fedmaml.federated import codec

MEMORY_KEY = "fedmaml.memory"


class ContextStateStore(MemoryStore):
    """Memories in ``Context.state`` (kept in RAM by Flower for the whole run, per node).

    The state holds the memory as Flower's bytes. A node's next load would decode what its last
    save encoded, so the store remembers the tensors it saved, for as long as the state holds that
    very record (unchanged): in-process, a load is then a lookup. Contexts that travel (Ray actors)
    arrive as other objects and are decoded as usual.
    """

    def __init__(self, context: Context) -> None:
        self.state = context.state

    def load(self) -> Params | None:
        record = self.state.get(MEMORY_KEY)  # not state.array_records: that copies the RecordDict
        if not isinstance(record, ArrayRecord):
            return None
        saved = _SAVED.get(id(record))
        if saved is not None and saved[0]() is record and saved[1] == _identity(record):
            return dict(saved[2])
        return dict(codec.decode(record))

    def save(self, memory: Params) -> None:
        record = codec.encode(memory)  # Flower's format, minus its header cost
        self.state[MEMORY_KEY] = record
        key = id(record)
        # the entry goes when the record does (the next save replaces it), so ids are never reused
        ref = weakref.ref(record, lambda _: _SAVED.pop(key, None))
        _SAVED[key] = (ref, _identity(record), {k: v.detach().cpu() for k, v in memory.items()})


#: id(record) -> (weak reference to it, its arrays' identity, the tensors it was encoded from).
#: Client updates never modify their inputs, so handing the saved tensors out again is safe.
_SAVED: dict[int, tuple[weakref.ref, tuple, Params]] = {}


def _identity(record) -> tuple:
    """The record's Array objects and their byte strings: any change to the record changes it."""
    return tuple((k, id(a), id(a.data)) for k, a in record.items())


class FileStore(MemoryStore):
    """Memories in ``<directory>/memory-<client>.pt``, loaded at every use and saved atomically.

    ``like``: the model's parameters (the expected names and per-task shapes), checked on load.
    ``reset_corrupt``: move an unreadable or mismatched file to ``<name>.corrupt-<UTC time>`` and
    start fresh instead of failing. ``report``: called with one line per load and save (path, tasks,
    a digest of the bytes), so a device's log shows which memory a client used. ``reset`` becomes
    true when a load moved a bad file aside, so the client can say so in its reply.
    """

    def __init__(self, directory: str | Path, client_id: int, like: Params | None = None, *,
                 reset_corrupt: bool = False, report: Callable[[str], None] | None = None) -> None:
        self.path = Path(directory) / f"memory-{client_id}.pt"
        self.client_id = client_id
        self.like = like
        self.reset_corrupt = reset_corrupt
        self.report = report
        self.reset = False

    def load(self) -> Params | None:
        if not self.path.exists():
            return None
        try:
            data = self.path.read_bytes()
            memory = self._check(data)
        except (OSError, DataError) as e:
            problem = e if isinstance(e, DataError) else DataError(f"memory file {self.path}: {e}")
            if not self.reset_corrupt:
                raise DataError(f"{problem}. It was left as it is. To start client {self.client_id}"
                                " with a fresh memory, move the file away, or restart the SuperNode "
                                "with memory-reset=true in its --node-config (`fedmaml deploy "
                                "supernode --memory-reset`)") from None
            stamp = f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
            aside, n = self.path.with_name(stamp), 1
            while aside.exists():  # a file set aside in the same second is kept too
                aside, n = self.path.with_name(f"{stamp}-{n}"), n + 1
            self.path.replace(aside)
            self.reset = True
            self._say(f"{problem}; moved to {aside.name}, starting with a fresh memory "
                      "(memory-reset=true)")
            return None
        self._say(f"loaded {self.path} ({_tasks(memory)} tasks, sha256 {digest(data)})")
        return memory

    def save(self, memory: Params) -> None:
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in memory.items()}, buffer)
        data = buffer.getvalue()
        atomic_write_bytes(self.path, data, mode=PRIVATE)  # derived from the client's own data
        self._say(f"saved {self.path} ({_tasks(memory)} tasks, sha256 {digest(data)})")

    def _check(self, data: bytes) -> Params:
        """The memory in ``data``, or a DataError saying what is wrong with it."""
        try:
            memory = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for truncated or foreign files
            # Not torch's text: for a foreign file it suggests weights_only=False, i.e. running code.
            raise DataError(f"memory file {self.path} is unreadable: truncated, or not written by "
                            f"fedmaml ({len(data)} bytes; torch: {type(e).__name__})") from None
        if not isinstance(memory, dict) or not memory or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) and v.dim() >= 1
                for k, v in memory.items()):
            raise DataError(f"memory file {self.path} does not hold a memory (a non-empty dict of "
                            "parameter name -> tensor with a leading task axis)")
        if len({v.shape[0] for v in memory.values()}) != 1:
            raise DataError(f"memory file {self.path}: its tensors disagree on the number of tasks "
                            f"({sorted({v.shape[0] for v in memory.values()})})")
        if self.like is not None:
            if list(memory) != list(self.like):
                raise DataError(f"memory file {self.path} has parameters {list(memory)}, expected "
                                f"{list(self.like)} (was it written for another model?)")
            for k, v in memory.items():
                if tuple(v.shape[1:]) != tuple(self.like[k].shape):
                    raise DataError(f"memory file {self.path}: {k!r} has per-task shape "
                                    f"{list(v.shape[1:])}, expected {list(self.like[k].shape)}")
        return memory

    def _say(self, text: str) -> None:
        if self.report is not None:
            self.report(f"client {self.client_id}: memory {text}")


def digest(data: bytes) -> str:
    """A short content digest (the first 16 hex digits of SHA-256), for logs and checks."""
    return hashlib.sha256(data).hexdigest()[:16]


def _tasks(memory: Params) -> int:
    return next(iter(memory.values())).shape[0]
