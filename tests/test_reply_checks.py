"""A peer's train reply is used whole or not at all: a number the server reads that is not a
number fails that reply alone (counted as malformed), and the round goes on with the others."""

import logging

import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmaml.federated import codec
from fedmaml.federated import records as R
from fedmaml.federated.setup import setup_for
from fedmaml.federated.strategy import MetaStrategy


def client_reply(like, cid, count, value, **metrics):
    m = {R.PARTITION: cid, R.NUM_EXAMPLES: count, "samples": 7, "train-seconds": 0.25,
         "loss-before": 2.0, "loss-after": 1.0, **metrics}
    update = {k: torch.full_like(v, float(value)) for k, v in like.items()}
    return Message(RecordDict({R.ARRAYS: codec.encode(update), R.METRICS: MetricRecord(m)}), 1,
                   "train")


@pytest.mark.parametrize("key", ["loss-before", "loss-after", R.MEMORY_RESET])
def test_a_per_client_reply_whose_metric_is_not_a_number_is_malformed(tiny_config, caplog, key):
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    strategy = MetaStrategy(setup_for(tiny_config("algorithm.name=moml")))
    strategy.round_stats = {"clients": [0, 1, 2]}
    bad = client_reply(strategy.w, 1, 2, 1.0, **{key: [1.0, 2.0]})
    with caplog.at_level(logging.WARNING, logger="fedmaml"):
        _, metrics = strategy.aggregate_train(1, [bad, client_reply(strategy.w, 2, 2, 3.0)])
    assert strategy.round_stats["failures_by_kind"]["malformed"] == 1
    assert set(strategy.trained) == {2}
    assert "malformed reply" in caplog.text and "float() argument must be" in caplog.text
    assert metrics["loss-before"] == 2.0 and metrics["loss-after"] == 1.0
