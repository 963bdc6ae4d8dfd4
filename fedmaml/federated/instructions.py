"""What a train or evaluate instruction carries, decoded, and a train reply, encoded: the message
side of a client's round, shared by the ClientApp and the vectorized engine (the round itself is the
client library's, :mod:`fedmaml.client`)."""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedmaml.algorithms import Hyper
from fedmaml.client import to_device
from fedmaml.core.params import Params
from fedmaml.core.patterns import Pattern
from fedmaml.federated import pattern_selection as selected
from fedmaml.federated import records as R
from fedmaml.federated.setup import ExperimentSetup


def train_instruction(msg: Message, setup: ExperimentSetup, device: torch.device
                      ) -> tuple[Params, int, Hyper]:
    """The meta-model ``w_r``, the round and the hyperparameters a train instruction carries."""
    w = to_device(_decode_shared(msg.content[R.ARRAYS], setup.initial_params, "train instruction"),
                  device)
    config = msg.content[R.CONFIG]
    hp = setup.hyper.with_eta(float(config[R.ETA]))
    hp = selected.hyper_for(hp, config, setup)  # a selected pattern, if sent
    return w, int(config[R.ROUND]), hp


_last_decoded: list[tuple[tuple, Params]] = []


def _decode_shared(record: Any, like: Params, what: str) -> Params:
    """``R.from_record``, decoding once when consecutive messages carry the very same record: an
    in-process engine hands every client of a round the server's one ArrayRecord object. The key
    holds the record, its arrays and their bytes, so a record changed in place is decoded again;
    the tensors are shared, which is safe because client updates never modify their inputs."""
    model = R.kept_tensors(record)  # the server's record of w_r, made in this very process
    if model is not None and list(model) == list(like) and all(
            model[k].shape == like[k].shape and model[k].dtype == like[k].dtype for k in like):
        return model
    arrays = list(record.values())
    key = (record, like, *arrays, *(a.data for a in arrays))
    if _last_decoded and len(_last_decoded[0][0]) == len(key) and all(
            x is y for x, y in zip(_last_decoded[0][0], key)):
        return _last_decoded[0][1]
    params = R.from_record(record, like, what)
    _last_decoded[:] = [(key, params)]
    return params


def train_reply(msg: Message, delta: ArrayRecord, metrics: MetricRecord) -> Message:
    """The reply to a train instruction: the encoded update ``w - w_r`` and the metrics."""
    return Message(RecordDict({R.ARRAYS: delta, R.METRICS: metrics}), reply_to=msg)


def evaluate_instruction(msg: Message, setup: ExperimentSetup) -> tuple[Params, Pattern]:
    """The meta-model and the evaluation pattern an evaluate instruction carries."""
    w = R.from_record(msg.content[R.ARRAYS], setup.initial_params, "evaluate instruction")
    return w, selected.eval_pattern_for(msg.content.get(R.CONFIG, {}), setup)


