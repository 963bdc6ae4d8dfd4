"""The fedmaml ``ClientApp``: a thin translation from Flower messages to the algorithm's client update.

Each node serves one client id (``partition-id`` in its node config). Ids ``0 .. num_clients-1`` are
training clients; ids ``num_clients ..`` are unseen clients that are only ever evaluated. The node's
memories live in a :mod:`memory store <fedmaml.federated.memory_store>`: ``Context.state`` by default,
a file store when the node config has ``memory-dir`` (devices).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmaml.algorithms import RoundData, client_update, draw_round
from fedmaml.core.evaluation import personalized_metrics
from fedmaml.core.params import Params
from fedmaml.core.patterns import Pattern
from fedmaml.federated import pattern_selection as selected
from fedmaml.federated import records as R
from fedmaml.federated.memory_store import ContextStateStore, FileStore, MemoryStore
from fedmaml.federated.setup import ExperimentSetup, client_generator, resolve_device, setup_for


def make_client_app(config: Any = None) -> ClientApp:
    """A ClientApp for ``config``; with ``None`` the config comes from the run config (``flwr run``)."""
    app = ClientApp()

    def resolve(context: Context) -> tuple[Any, ExperimentSetup, int]:
        cfg = config if config is not None else config_from_run_config(context.run_config)
        if cfg.engine.torch_threads and torch.get_num_threads() != cfg.engine.torch_threads:
            torch.set_num_threads(cfg.engine.torch_threads)
        return cfg, setup_for(cfg), int(context.node_config[R.PARTITION])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, setup, cid = resolve(context)
        if cid >= setup.federation.num_clients:
            raise ValueError(f"client {cid} is an unseen (evaluation-only) client and cannot train")
        start = time.perf_counter()
        device = resolve_device(cfg.engine.device)
        w = to_device(R.from_record(msg.content[R.ARRAYS], setup.initial_params,
                                    "train instruction"), device)
        server_round = int(msg.content[R.CONFIG][R.ROUND])
        hp = setup.hyper.with_eta(float(msg.content[R.CONFIG][R.ETA]))
        hp = selected.hyper_for(hp, msg.content[R.CONFIG], setup)  # a selected pattern, if sent
        store = memory_store(context, setup, cid)
        memory = store.load() if setup.algorithm.uses_memory else None
        memory = None if memory is None else to_device(memory, device)
        fresh = setup.algorithm.uses_memory and (memory is None or hp.memory_policy == "reinit")
        tasks = setup.federation.client_tasks(cid)
        data = draw_round(tasks, hp, client_generator(cfg.seed, cid, server_round),
                          extra=setup.algorithm.needs_extra_batch(hp), init=fresh).to(device)
        delta, memory, metrics = client_update(setup.algorithm, setup.model, setup.loss_fn, hp, w,
                                               memory, data)
        if memory is not None:
            store.save(memory)
        examples = sum(t.num_examples for t in tasks)
        reply = MetricRecord({R.NUM_EXAMPLES: examples, R.PARTITION: cid,
                              "samples": samples_drawn(data),
                              "train-seconds": time.perf_counter() - start,
                              **{k.replace("_", "-"): float(v) for k, v in metrics.items()}})
        return Message(RecordDict({R.ARRAYS: R.to_record(delta), R.METRICS: reply}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg, setup, cid = resolve(context)
        w = R.from_record(msg.content[R.ARRAYS], setup.initial_params, "evaluate instruction")
        pattern = selected.eval_pattern_for(msg.content.get(R.CONFIG, {}), setup)
        metrics = evaluate_client(setup, cid, w, memory_store(context, setup, cid), pattern)
        return Message(RecordDict({R.METRICS: MetricRecord(metrics)}), reply_to=msg)

    @app.query("select")
    def select(msg: Message, context: Context) -> Message:
        """Measure Lambda-pattern candidates on this client's held-out split and device."""
        _, setup, cid = resolve(context)
        return selected.handle_select(setup, cid, msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        cid = int(context.node_config[R.PARTITION])
        return Message(RecordDict({R.METRICS: MetricRecord({R.PARTITION: cid})}), reply_to=msg)

    return app


def to_device(params: Params, device: torch.device) -> Params:
    return {k: v.to(device) for k, v in params.items()}


def samples_drawn(data: RoundData) -> int:
    """Training examples a round consumed (support, query, Hessian-free and memory-init batches)."""
    batches = [data.support, data.query, data.extra, data.init]
    # targets are [..., n] (classification) or [..., n, 1] (regression): one number per example
    return sum(b[1].numel() for b in batches if b is not None)


def memory_store(context: Context, setup: ExperimentSetup, cid: int) -> MemoryStore:
    directory = context.node_config.get("memory-dir")
    if directory:
        return FileStore(str(directory), cid, like=setup.initial_params)
    return ContextStateStore(context)


def evaluate_client(setup: ExperimentSetup, cid: int, w: Params, store: MemoryStore,
                    pattern: Pattern | None = None) -> dict[str, float]:
    """Personalized metrics of one client, from ``w`` and (if it has one) from its memory, adapting
    with ``pattern`` (default: the config's evaluation pattern)."""
    pattern = setup.eval_pattern if pattern is None else pattern
    fed = setup.federation
    unseen = cid >= fed.num_clients
    tasks = fed.unseen_tasks(cid - fed.num_clients) if unseen else fed.client_tasks(cid)
    from_memory = setup.algorithm.uses_memory and setup.config.evaluation.from_memory
    memory = store.load() if from_memory and not unseen else None
    sums: dict[str, float] = {}
    start = time.perf_counter()
    for i, task in enumerate(tasks):
        split = task.evaluation_split()
        starts = {"": w}
        if memory is not None:
            starts["memory-"] = {k: v[i] for k, v in memory.items()}
        for prefix, params in starts.items():
            m = personalized_metrics(setup.model, setup.loss_fn, params, *split, pattern,
                                     setup.eval_alpha, setup.classification)
            for k, v in m.items():
                sums[prefix + k] = sums.get(prefix + k, 0.0) + float(v) / len(tasks)
    sums["adapt-ms"] = (time.perf_counter() - start) * 1000 / len(tasks)
    sums[R.NUM_EXAMPLES] = sum(len(t.evaluation_split()[2]) for t in tasks)
    sums[R.PARTITION] = cid
    sums["unseen"] = int(unseen)
    return sums


def config_from_run_config(run_config: Any) -> Any:
    from fedmaml.config import config_from_flat

    return config_from_flat(dict(run_config), source="Flower run config")


# The app that ``flwr run .`` loads (see [tool.flwr.app.components] in pyproject.toml).
app = make_client_app()
