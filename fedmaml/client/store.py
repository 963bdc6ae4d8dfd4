"""Where a client's memory lives, as the client library sees it: anything with ``load``/``save``."""

from __future__ import annotations

from typing import Protocol

from fedmaml.core.params import Params


class MemoryStore(Protocol):
    """A client's memory: ``Context.state``, a file on a device, a row of a memory bank... The one
    interface of every store: fedmaml/federated/memory_store.py (``ContextStateStore``,
    ``FileStore``) and fedmaml/engines/memory_bank.py (``BankStore``) implement it."""

    def load(self) -> Params | None: ...

    def save(self, memory: Params) -> None: ...


class NoMemory:
    """The memory store of algorithms that keep no memory."""

    def load(self) -> None:
        return None

    def save(self, memory: Params) -> None:  # pragma: no cover - never called without memory
        raise RuntimeError("this algorithm keeps no memory")


def was_reset(store: object) -> bool:
    """Whether a corrupt memory file was moved aside (``memory-reset=true``; file stores)."""
    return bool(getattr(store, "reset", False))
