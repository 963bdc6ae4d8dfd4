"""The fedmaml ``ClientApp``: decode a Flower message, run the client library, encode the reply.

Each node serves one client id (``partition-id`` in its node config). Ids ``0 .. num_clients-1`` are
training clients; ids ``num_clients ..`` are unseen clients that are only ever evaluated. The node's
memories live in a :mod:`memory store <fedmaml.federated.memory_store>`: ``Context.state`` by default,
a file store when the node config has ``memory-dir`` (devices). The client's round itself (data,
faults, update, clipping, speed, deadline, metrics, evaluation) is the transport-free client
library, :mod:`fedmaml.client`, which the vectorized engine and batches of runs call too.
"""

from __future__ import annotations

import time
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmaml.client import MemoryStore, evaluate_client, past_deadline, train_step
from fedmaml.client.faults import client_fault
from fedmaml.config import Config
from fedmaml.federated import checkpoint, faults
from fedmaml.federated import pattern_selection as selected
from fedmaml.federated import node_config
from fedmaml.federated import records as R
from fedmaml.federated.instructions import (evaluate_instruction, train_instruction,
                                            train_reply)
from fedmaml.federated.setup import ExperimentSetup, resolve_device, setup_for, use_torch_threads


def make_client_app(config: Config | None = None) -> ClientApp:
    """A ClientApp for ``config``; with ``None`` the config comes from the run config (``flwr run``)."""
    app = ClientApp()

    def resolve(context: Context) -> tuple[Config, ExperimentSetup, int, MemoryStore]:
        """The node's config, setup, client id and memory store (the node's ``Context.state``, or
        files on the device when its node config has memory-dir)."""
        cfg = config if config is not None else config_from_run_config(context.run_config)
        cfg = node_config.with_node_data(cfg, context)  # a device's own data-path
        use_torch_threads(cfg.engine)
        setup, cid = setup_for(cfg), node_config.client_id(context)
        return cfg, setup, cid, node_config.memory_store(context, cid, like=setup.initial_params)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, setup, cid, store = resolve(context)
        return train_client(msg, cfg, setup, cid, store)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        _, setup, cid, store = resolve(context)
        w, pattern = evaluate_instruction(msg, setup)
        metrics = evaluate_client(setup, cid, w, store, pattern)
        return Message(RecordDict({R.METRICS: MetricRecord(metrics)}), reply_to=msg)

    @app.query("select")
    def select(msg: Message, context: Context) -> Message:
        """Measure Lambda-pattern candidates on this client's held-out split and device."""
        _, setup, cid, _ = resolve(context)
        return selected.handle_select(setup, cid, msg)

    @app.query("memory")
    def memory(msg: Message, context: Context) -> Message:
        """Hand the memory to the run's checkpoint, or take it back on resume (checkpoint.py)."""
        _, setup, cid, store = resolve(context)
        return checkpoint.memory_query_reply(msg, store, cid, setup.initial_params)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        cid = int(context.node_config[R.PARTITION])
        return Message(RecordDict({R.METRICS: MetricRecord({R.PARTITION: cid})}), reply_to=msg)

    return app


# -- a train round: decode, the client library, encode -----------------------------------------
def train_client(msg: Message, cfg: Config, setup: ExperimentSetup, cid: int, store: MemoryStore
                 ) -> Message:
    """One client's train round: instruction -> client library (faults, update) -> reply."""
    start = time.perf_counter()
    device = resolve_device(cfg.engine.device)
    w, server_round, hp = train_instruction(msg, setup, device)
    fault = client_fault(cfg, cid, server_round)  # injected (faults.*): None in real runs
    if fault == "fail":
        raise faults.fail(cid, server_round)
    if fault == "dropout":
        return faults.dropout_reply(msg, cid)
    delta, metrics = train_step(cfg, setup, cid, w, hp, server_round, store, device, start)
    reply = train_reply(msg, R.to_record(delta), MetricRecord(metrics))
    late = fault == "straggle" or past_deadline(cfg, float(metrics["train-seconds"]))
    return faults.mark_late(reply) if late else reply


def config_from_run_config(run_config: Any) -> Config:
    from fedmaml.config import config_from_flat

    return config_from_flat(dict(run_config), source="Flower run config")


# The app that ``flwr run .`` loads (see [tool.flwr.app.components] in pyproject.toml).
app = make_client_app()
