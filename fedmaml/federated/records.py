"""What travels in Flower messages, and the checks applied to everything a peer sends.

Train instruction: ``arrays`` (the meta-model ``w_r``) and ``config`` (``server-round``, ``eta``).
Train reply: ``arrays`` (the update ``delta = w - w_r``) and ``metrics`` (``num-examples``, losses,
timing). Evaluate instruction: ``arrays`` and ``config``; reply: ``metrics`` only. Query (partition
discovery): the reply's ``metrics`` carry the node's ``partition-id``. Memories never appear here.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message

from fedmaml.core.params import Params
from fedmaml.errors import MessageError
from fedmaml.federated import codec

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
ROUND, ETA = "server-round", "eta"
NUM_EXAMPLES, PARTITION = "num-examples", "partition-id"


def to_record(params: Params) -> ArrayRecord:
    return codec.encode(params)  # Flower's format, without its per-array header cost


def from_record(record: ArrayRecord, like: Params, what: str) -> Params:
    """Parameters from a peer's record, checked against the expected names and shapes."""
    tensors = codec.decode(record)
    if list(tensors) != list(like):
        missing = sorted(set(like) - set(tensors))
        extra = sorted(set(tensors) - set(like))
        raise MessageError(f"{what}: parameter names differ from the model's "
                           f"(missing {missing}, unexpected {extra})")
    for k, v in tensors.items():
        if v.shape != like[k].shape:
            raise MessageError(f"{what}: parameter {k!r} has shape {list(v.shape)}, "
                               f"expected {list(like[k].shape)}")
        if not np.isfinite(v.numpy()).all():  # numpy: ~4x faster than torch on small arrays
            raise MessageError(f"{what}: parameter {k!r} contains NaN or infinite values")
    return {k: v if v.dtype == like[k].dtype else v.to(like[k].dtype) for k, v in tensors.items()}


def message_bytes(message: Message) -> int:
    """Bytes of the arrays a message carries (the payload that dominates communication)."""
    if not message.has_content():
        return 0
    # not content.array_records: that builds a filtered copy of the RecordDict on every call
    return sum(r.count_bytes() for r in message.content.values() if isinstance(r, ArrayRecord))
