"""All simulated clients' memories in one stacked store, read and written by client id.

The vectorized engine trains a whole cohort per call, so it wants the cohort's memories as one
stacked tensor per parameter (``[clients, tasks, ...]``), not one ``Context.state`` record per node.
A :class:`MemoryBank` keeps them that way:

* **Lazy**: a client takes a row (a *slot*) only when its first memory is written, and slots are
  handed out in order, so the store holds exactly the clients that have trained (a million-client
  federation with 1 % sampling stores what its participants need, not a million rows).
* **RAM (or GPU) or disk**: storage starts in RAM, or on ``device`` (a GPU that runs the cohorts),
  and grows by doubling; once it would exceed ``budget_mb`` it moves to memory-mapped files (one per parameter) in ``directory`` (a temporary
  directory, removed on :meth:`close`, when none is given), and keeps growing there. The OS then
  pages memories in and out; the engine reads and writes only the sampled cohort's rows.
* **Checkpointable**: :meth:`save` writes the stored rows and their client ids atomically;
  :meth:`restore` reads them back (checked against the model's parameter names and shapes).

Only the vectorized engine uses it; the other engines keep each node's memory in its own
:mod:`memory store <fedmaml.federated.memory_store>`. :class:`BankStore` gives one client's view of
the bank through that same store interface, for the clients the engine runs one by one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fedmaml.atomic import PRIVATE, atomic_torch_save
from fedmaml.client.store import MemoryStore
from fedmaml.core.params import Params
from fedmaml.errors import DataError
from fedmaml.federated.bank_state import CHECKPOINT_FORMAT, bank_state

MIN_CAPACITY = 64


#: Up to this many ids, a Python set checks them for duplicates faster than ``np.unique``.
_FEW_IDS = 64


class MemoryBank:
    """Stacked memories of up to ``num_clients`` clients; each row holds one client's tasks.

    ``like`` gives the per-task parameter names, shapes and dtypes (e.g. the initial parameters).
    The number of tasks per client is taken from the first write and must then stay the same.
    """

    def __init__(self, like: Params, num_clients: int, *, budget_mb: float = 4096.0,
                 directory: str | Path | None = None,
                 device: torch.device | str = "cpu") -> None:
        if num_clients < 1:
            raise ValueError(f"a memory bank needs at least one client, got {num_clients}")
        self.like = {k: v.detach() for k, v in like.items()}
        self.num_clients = num_clients
        self.budget_bytes = int(budget_mb * 2 ** 20)
        self._directory = Path(directory) if directory else None
        self._tempdir: str | None = None
        self._slot = np.full(num_clients, -1, dtype=np.int64)  # client id -> row (-1: none yet)
        self._owner = np.empty(0, dtype=np.int64)  # row -> client id
        self._used = 0
        self._tasks: int | None = None
        self._store: dict[str, Tensor] = {}
        self._maps: dict[str, np.memmap] = {}
        self._cleanup: weakref.finalize | None = None
        #: Where the store lives while it fits the budget (e.g. the GPU the cohort runs on: reads
        #: and writes are then device-side gathers and scatters); beyond it, files on the host.
        self.device = torch.device(device)

    # -- queries --------------------------------------------------------------------------------
    @property
    def num_stored(self) -> int:
        """Clients that have a memory."""
        return self._used

    @property
    def on_disk(self) -> bool:
        return bool(self._maps)

    @property
    def path(self) -> Path | None:
        """Directory of the memory-mapped files (``None`` while the bank is in RAM)."""
        if not self.on_disk:
            return None
        return self._directory or Path(self._tempdir)

    @property
    def row_bytes(self) -> int:
        """Bytes of one client's memories."""
        per_task = sum(v.numel() * v.element_size() for v in self.like.values())
        return per_task * (self._tasks or 1)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored memories (the allocated capacity may be up to twice this)."""
        return self._used * self.row_bytes

    def contains(self, cids: Sequence[int]) -> np.ndarray:
        """A boolean per client id: does it have a memory?"""
        return self._slot[self._check_ids(cids)] >= 0

    def client_ids(self) -> np.ndarray:
        """Ids of the clients with a memory, in the order they were first stored."""
        return self._owner[:self._used].copy()

    # -- reading and writing ----------------------------------------------------------------------
    def read(self, cids: Sequence[int]) -> Params:
        """The memories of ``cids`` stacked as ``[len(cids), tasks, ...]`` (copies, not views)."""
        ids = self._check_ids(cids)
        rows = self._slot[ids]
        if (rows < 0).any():
            missing = ids[rows < 0].tolist()
            raise KeyError(f"no memory stored for client(s) {missing[:10]}")
        index = torch.from_numpy(rows)
        return {k: s.index_select(0, index.to(s.device)) for k, s in self._store.items()}

    def write(self, cids: Sequence[int], memory: Params) -> None:
        """Store stacked memories ``[len(cids), tasks, ...]``; clients seen for the first time get a row."""
        ids = self._check_ids(cids)
        if (len(set(ids.tolist())) if len(ids) <= _FEW_IDS else len(np.unique(ids))) != len(ids):
            raise ValueError("write() got the same client id twice in one call")
        self._check_memory(memory, len(ids))
        new = ids[self._slot[ids] < 0]
        if len(new):
            self._reserve(self._used + len(new))
            rows = np.arange(self._used, self._used + len(new))
            self._slot[new] = rows
            self._owner[rows] = new
            self._used += len(new)
        index = torch.from_numpy(self._slot[ids])
        for k, s in self._store.items():
            s.index_copy_(0, index.to(s.device),
                          memory[k].detach().to(device=s.device, dtype=s.dtype))

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The stored rows and their client ids (copied out of the store)."""
        n = self._used
        return bank_state(self.num_clients, torch.from_numpy(self._owner[:n].copy()),
                          {k: s[:n].to("cpu", copy=True) for k, s in self._store.items()})

    def save(self, path: str | Path) -> None:
        """Write a checkpoint atomically (a crash leaves the previous checkpoint intact)."""
        atomic_torch_save(self.state_dict(), path, mode=PRIVATE)  # the clients' memories

    def restore(self, path: str | Path) -> None:
        """Replace the bank's contents by a checkpoint written by :meth:`save`."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for truncated or foreign files
            raise DataError(f"memory bank checkpoint {path} is unreadable ({e})") from None
        self.load_state_dict(state, str(path))

    def load_state_dict(self, state: dict, where: str = "memory bank state") -> None:
        """Replace the bank's contents by a :meth:`state_dict` (``where`` names it in errors)."""
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise DataError(f"{where} is not a memory bank checkpoint (format {CHECKPOINT_FORMAT})")
        if state["num_clients"] != self.num_clients:
            raise DataError(f"memory bank checkpoint {where} is for {state['num_clients']} "
                            f"clients, this federation has {self.num_clients}")
        memory, ids = state["memory"], state["client_ids"].numpy()
        if list(memory) != list(self.like):
            raise DataError(f"memory bank checkpoint {where} has parameters {list(memory)}, "
                            f"expected {list(self.like)} (was it written for another model?)")
        self._reset()
        if len(ids):
            try:
                self.write(ids.tolist(), memory)
            except ValueError as e:
                raise DataError(f"memory bank checkpoint {where}: {e}") from None

    def close(self) -> None:
        """Drop the storage; a temporary directory of memory-mapped files is deleted."""
        self._reset()
        if self._cleanup is not None:
            self._cleanup()

    # -- internals --------------------------------------------------------------------------------
    def _check_ids(self, cids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(cids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_clients):
            bad = ids[(ids < 0) | (ids >= self.num_clients)].tolist()
            raise IndexError(f"client id(s) {bad[:10]} outside 0..{self.num_clients - 1}")
        return ids

    def _check_memory(self, memory: Params, n: int) -> None:
        if list(memory) != list(self.like):
            raise ValueError(f"memory has parameters {list(memory)}, expected {list(self.like)}")
        tasks = None
        for k, v in memory.items():
            if v.dim() != self.like[k].dim() + 2 or v.shape[0] != n \
                    or tuple(v.shape[2:]) != tuple(self.like[k].shape):
                raise ValueError(f"memory {k!r} has shape {list(v.shape)}, expected "
                                 f"[{n}, tasks, {', '.join(map(str, self.like[k].shape))}]")
            tasks = v.shape[1] if tasks is None else tasks
            if v.shape[1] != tasks:
                raise ValueError("memory parameters disagree on the number of tasks")
        if self._tasks is None:
            self._tasks = tasks
        elif tasks != self._tasks:
            raise ValueError(f"memories hold {tasks} task(s) per client, this bank "
                             f"{self._tasks}: every client must have the same number of tasks")

    def _reserve(self, needed: int) -> None:
        if needed <= len(self._owner):  # the rows allocated
            return
        capacity = min(self.num_clients, max(MIN_CAPACITY, needed, 2 * len(self._owner)))
        was_on_disk = self.on_disk
        old, n = self._store, self._used
        if was_on_disk or capacity * self.row_bytes > self.budget_bytes:
            self._store = self._map_files(capacity)  # grows the files; existing rows stay put
        else:
            self._store = {k: torch.empty(capacity, self._tasks, *v.shape, dtype=v.dtype,
                                          device=self.device) for k, v in self.like.items()}
        if not was_on_disk:  # rows move from the old RAM store (growing files keeps them)
            for k, s in old.items():
                self._store[k][:n] = s[:n].to(self._store[k].device)
        owner = np.empty(capacity, dtype=np.int64)
        owner[:n] = self._owner[:n]
        self._owner = owner

    def _map_files(self, capacity: int) -> dict[str, Tensor]:
        directory = self._directory
        if directory is None:
            if self._tempdir is None:
                self._tempdir = tempfile.mkdtemp(prefix="fedmaml-memory-bank-")
                self._cleanup = weakref.finalize(self, shutil.rmtree, self._tempdir, True)
            directory = Path(self._tempdir)
        directory.mkdir(parents=True, exist_ok=True)
        store = {}
        for k, v in self.like.items():
            dtype = torch.empty(0, dtype=v.dtype).numpy().dtype
            shape = (capacity, self._tasks, *v.shape)
            path = directory / f"{k}.bin"
            if k not in self._maps:  # a fresh file (a stale one from an earlier run is replaced)
                path.unlink(missing_ok=True)
            size = int(np.prod(shape)) * dtype.itemsize
            # extend without touching existing bytes; owner-only like every file of memories
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE),
                           "ab") as f:
                f.truncate(size)
            self._maps[k] = np.memmap(path, dtype=dtype, mode="r+", shape=shape)
            store[k] = torch.from_numpy(self._maps[k])
        return store

    def _reset(self) -> None:
        for m in self._maps.values():
            m.flush()
        self._store, self._maps = {}, {}
        self._slot[:] = -1
        self._owner = np.empty(0, dtype=np.int64)
        self._used = 0
        self._tasks = None


class BankStore(MemoryStore):
    """One client's memory in a :class:`MemoryBank`, behind the per-node memory-store interface."""

    def __init__(self, bank: MemoryBank, client_id: int,
                 device: torch.device | str | None = None) -> None:
        self.bank, self.client_id = bank, client_id
        self.device = device  # where load() hands the memory out (None: where the bank keeps it)

    def load(self) -> Params | None:
        if not self.bank.contains([self.client_id])[0]:
            return None
        return {k: v[0] if self.device is None else v[0].to(self.device)
                for k, v in self.bank.read([self.client_id]).items()}

    def save(self, memory: Params) -> None:
        self.bank.write([self.client_id], {k: v.unsqueeze(0) for k, v in memory.items()})
