"""Where a client's memories live. The interface is the same in simulation and on devices.

* :class:`ContextStateStore`: in the node's ``Context.state`` (simulation; lives as long as the run).
* :class:`FileStore`: a file in a directory on the device, written atomically (temp file, fsync,
  rename), so a kill during a write leaves the previous memory intact.

A store holds one stacked ``Params`` (leading axis = the client's tasks). Memories never leave the
client: nothing here is ever put into a reply message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from flwr.app import Context

from fedmaml.atomic import atomic_torch_save
from fedmaml.core.params import Params
from fedmaml.errors import DataError
from fedmaml.federated import codec

MEMORY_KEY = "fedmaml.memory"


class MemoryStore(Protocol):
    def load(self) -> Params | None: ...

    def save(self, memory: Params) -> None: ...


class ContextStateStore:
    """Memories in ``Context.state`` (kept in RAM by Flower for the whole run, per node)."""

    def __init__(self, context: Context) -> None:
        self.state = context.state

    def load(self) -> Params | None:
        record = self.state.array_records.get(MEMORY_KEY)
        return None if record is None else dict(codec.decode(record))

    def save(self, memory: Params) -> None:
        self.state[MEMORY_KEY] = codec.encode(memory)  # Flower's format, minus its header cost


class FileStore:
    """Memories in ``<directory>/memory-<client>.pt``; corrupt or mismatched files are errors."""

    def __init__(self, directory: str | Path, client_id: int, like: Params | None = None) -> None:
        self.path = Path(directory) / f"memory-{client_id}.pt"
        self.like = like  # expected per-task shapes (without the task axis), if known

    def load(self) -> Params | None:
        if not self.path.exists():
            return None
        try:
            memory = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for truncated or foreign files
            raise DataError(f"memory file {self.path} is unreadable ({e}); it was not replaced. "
                            "Move it away to start this client with a fresh memory.") from None
        if not isinstance(memory, dict) or not all(isinstance(v, torch.Tensor) for v in memory.values()):
            raise DataError(f"memory file {self.path} does not hold a dict of tensors")
        if self.like is not None:
            if list(memory) != list(self.like):
                raise DataError(f"memory file {self.path} has parameters {list(memory)}, expected "
                                f"{list(self.like)} (was it written for another model?)")
            for k, v in memory.items():
                if tuple(v.shape[1:]) != tuple(self.like[k].shape):
                    raise DataError(f"memory file {self.path}: {k!r} has per-task shape "
                                    f"{list(v.shape[1:])}, expected {list(self.like[k].shape)}")
        return memory

    def save(self, memory: Params) -> None:
        atomic_torch_save({k: v.detach().cpu() for k, v in memory.items()}, self.path)
