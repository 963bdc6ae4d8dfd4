"""A memory bank's serialisable form: the dict that checkpoints hold for all clients' memories.

Both the vectorized engine's :class:`~fedmaml.engines.memory_bank.MemoryBank` (which writes it) and
the run checkpoint (fedmaml/federated/checkpoint.py, which turns per-client memories into it and
back) need this form; it lives here, below both, so that federated code never imports an engine.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

CHECKPOINT_FORMAT = "fedmaml-memory-bank-1"


def bank_state(num_clients: int, client_ids: Tensor, memory: Mapping[str, Tensor]) -> dict:
    """The checkpoint form: stored rows ``memory[name][row]`` and the client id of each row."""
    return {"format": CHECKPOINT_FORMAT, "num_clients": num_clients, "client_ids": client_ids,
            "memory": dict(memory)}
