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
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmaml.algorithms import Hyper, RoundData, client_update, draw_cohort, draw_round
from fedmaml.config.schema import Config
from fedmaml.core.diagnostics import tracking_error
from fedmaml.core.privacy import clip_update
from fedmaml.core.evaluation import personalized_metrics
from fedmaml.core.params import Params
from fedmaml.core.patterns import Pattern
from fedmaml.data.tasks import Task
from fedmaml.federated import checkpoint, faults
from fedmaml.federated import pattern_selection as selected
from fedmaml.federated import node_config
from fedmaml.federated import records as R
from fedmaml.federated.memory_store import MemoryStore
from fedmaml.federated.participation import speed_multipliers
from fedmaml.federated.setup import (ExperimentSetup, client_round_keys, resolve_device,
                                     setup_for)


def make_client_app(config: Config | None = None) -> ClientApp:
    """A ClientApp for ``config``; with ``None`` the config comes from the run config (``flwr run``)."""
    app = ClientApp()

    def resolve(context: Context) -> tuple[Config, ExperimentSetup, int]:
        cfg = config if config is not None else config_from_run_config(context.run_config)
        cfg = node_config.with_node_data(cfg, context)  # a device's own data-path
        if cfg.engine.torch_threads and torch.get_num_threads() != cfg.engine.torch_threads:
            torch.set_num_threads(cfg.engine.torch_threads)
        return cfg, setup_for(cfg), node_config.client_id(context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, setup, cid = resolve(context)
        return train_client(msg, cfg, setup, cid, memory_store(context, setup, cid))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg, setup, cid = resolve(context)
        w, pattern = evaluate_instruction(msg, setup)
        metrics = evaluate_client(setup, cid, w, memory_store(context, setup, cid), pattern)
        return Message(RecordDict({R.METRICS: MetricRecord(metrics)}), reply_to=msg)

    @app.query("select")
    def select(msg: Message, context: Context) -> Message:
        """Measure Lambda-pattern candidates on this client's held-out split and device."""
        _, setup, cid = resolve(context)
        return selected.handle_select(setup, cid, msg)

    @app.query("memory")
    def memory(msg: Message, context: Context) -> Message:
        """Hand the memory to the run's checkpoint, or take it back on resume (checkpoint.py)."""
        _, setup, cid = resolve(context)
        return checkpoint.memory_query_reply(msg, memory_store(context, setup, cid), cid,
                                             setup.initial_params)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        cid = int(context.node_config[R.PARTITION])
        return Message(RecordDict({R.METRICS: MetricRecord({R.PARTITION: cid})}), reply_to=msg)

    return app


# -- the pieces of a train round, shared with the vectorized engine (which batches a cohort) --------
def train_client(msg: Message, cfg: Config, setup: ExperimentSetup, cid: int, store: MemoryStore
                 ) -> Message:
    """One client's train round: instruction -> data -> client update -> memory -> reply."""
    start = time.perf_counter()
    device = resolve_device(cfg.engine.device)
    w, server_round, hp = train_instruction(msg, setup, device)
    fault = faults.client_fault(cfg, cid, server_round)  # injected (faults.*): None in real runs
    if fault == "fail":
        raise faults.fail(cid, server_round)
    if fault == "dropout":
        return faults.dropout_reply(msg, cid)
    delta, metrics = train_step(cfg, setup, cid, w, hp, server_round, store, device, start)
    reply = train_reply(msg, R.to_record(delta), metrics)
    late = fault == "straggle" or past_deadline(cfg, float(metrics["train-seconds"]))
    return faults.mark_late(reply) if late else reply


def past_deadline(cfg: Config, seconds: float) -> bool:
    """Whether a client whose simulated train time is ``seconds`` misses the round deadline. Only
    simulated speeds (``participation.speed`` other than uniform) are judged here: a measured time
    is judged by the engine's clock, as a real reply would be."""
    timeout = cfg.federated.round_timeout
    return cfg.participation.speed != "uniform" and timeout > 0 and seconds > timeout


def train_step(cfg: Config, setup: ExperimentSetup, cid: int, w: Params, hp: Hyper,
               server_round: int, store: MemoryStore, device: torch.device,
               start: float | None = None) -> tuple[Params, MetricRecord]:
    """One client's update from a decoded instruction: memory -> data -> client update -> memory.
    Returns the update ``w - w_r`` (clipped with ``privacy.clipping: client``) and the reply's
    metrics (``train-seconds`` counted from ``start``, default now, times the client's simulated
    speed multiplier, ``participation.speed``)."""
    start = time.perf_counter() if start is None else start
    memory = store.load() if setup.algorithm.uses_memory else None
    memory = None if memory is None else to_device(memory, device)
    fresh = needs_memory_init(setup, hp, memory is not None)
    tasks, data = draw_client_round(cfg, setup, cid, hp, server_round, fresh)
    delta, memory, metrics = client_update(setup.algorithm, setup.model, setup.loss_fn, hp, w,
                                           memory, data.to(device), initial_for(setup, hp, device))
    if memory is not None:
        store.save(memory)
    if cfg.privacy.clipping == "client":  # the update leaves the device within the DP bound
        delta = clip_update(delta, cfg.privacy.clipping_norm)
    seconds = (time.perf_counter() - start) * float(
        speed_multipliers(cfg.participation, cfg.seed, [cid])[0])
    reply = train_metrics(cid, tasks, data, metrics, seconds)
    if getattr(store, "reset", False):  # a corrupt memory file was moved aside (memory-reset=true)
        reply[R.MEMORY_RESET] = 1
    return delta, reply


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
    arrays = list(record.values())
    key = (record, like, *arrays, *(a.data for a in arrays))
    if _last_decoded and len(_last_decoded[0][0]) == len(key) and all(
            x is y for x, y in zip(_last_decoded[0][0], key)):
        return _last_decoded[0][1]
    params = R.from_record(record, like, what)
    _last_decoded[:] = [(key, params)]
    return params


def initial_for(setup: ExperimentSetup, hp: Hyper, device: torch.device) -> Params | None:
    """The initial meta-model, when first memories adapt it (``algorithm.memory_init``)."""
    return to_device(setup.initial_params, device) if hp.memory_init == "initial_model" else None


def needs_memory_init(setup: ExperimentSetup, hp: Hyper, has_memory: bool) -> bool:
    return setup.algorithm.uses_memory and (not has_memory or hp.memory_policy == "reinit")


def draw_client_round(cfg: Config, setup: ExperimentSetup, cid: int, hp: Hyper, server_round: int,
                      fresh: bool) -> tuple[list[Task], RoundData]:
    """A training client's tasks and its round's data, from its own (seed, id, round) stream."""
    tasks = training_tasks(setup, cid)
    data = draw_round(tasks, hp, client_round_keys(cfg.seed, [cid], server_round)[0],
                      extra=setup.algorithm.needs_extra_batch(hp), init=fresh)
    return tasks, data


def draw_cohort_round(cfg: Config, setup: ExperimentSetup, cids: list[int], hp: Hyper,
                      server_round: int, fresh: bool, tasks: list[list[Task]] | None = None
                      ) -> tuple[list[list[Task]], RoundData]:
    """:func:`draw_client_round` for many clients at once (equal numbers of tasks), stacked along a
    leading client axis: each client's part equals its own draw. ``tasks``: the clients' tasks,
    if the caller has them already."""
    tasks = [training_tasks(setup, cid) for cid in cids] if tasks is None else tasks
    data = draw_cohort(tasks, hp, client_round_keys(cfg.seed, cids, server_round),
                       extra=setup.algorithm.needs_extra_batch(hp), init=fresh)
    return tasks, data


def training_tasks(setup: ExperimentSetup, cid: int) -> list[Task]:
    """A training client's tasks (an unseen client cannot train)."""
    if cid >= setup.federation.num_clients:
        raise ValueError(f"client {cid} is an unseen (evaluation-only) client and cannot train")
    return setup.federation.client_tasks(cid)


def train_metrics(cid: int, tasks: list[Task], data: RoundData, metrics: dict[str, Any],
                  seconds: float) -> MetricRecord:
    return MetricRecord({R.NUM_EXAMPLES: sum(t.num_examples for t in tasks), R.PARTITION: cid,
                         "samples": samples_drawn(data), "train-seconds": seconds,
                         **{k.replace("_", "-"): float(v) for k, v in metrics.items()}})


def train_reply(msg: Message, delta: ArrayRecord, metrics: MetricRecord) -> Message:
    """The reply to a train instruction: the encoded update ``w - w_r`` and the metrics."""
    return Message(RecordDict({R.ARRAYS: delta, R.METRICS: metrics}), reply_to=msg)


def evaluate_instruction(msg: Message, setup: ExperimentSetup) -> tuple[Params, Pattern]:
    """The meta-model and the evaluation pattern an evaluate instruction carries."""
    w = R.from_record(msg.content[R.ARRAYS], setup.initial_params, "evaluate instruction")
    return w, selected.eval_pattern_for(msg.content.get(R.CONFIG, {}), setup)


def to_device(params: Params, device: torch.device) -> Params:
    return {k: v.to(device) for k, v in params.items()}


def samples_drawn(data: RoundData) -> int:
    """Training examples a round consumed (support, query, Hessian-free and memory-init batches)."""
    batches = [data.support, data.query, data.extra, data.init]
    # targets are [..., n] (classification) or [..., n, 1] (regression): one number per example
    return sum(b[1].numel() for b in batches if b is not None)


def memory_store(context: Context, setup: ExperimentSetup, cid: int) -> MemoryStore:
    """The node's ``Context.state``, or files on the device when its node config has memory-dir."""
    return node_config.memory_store(context, cid, like=setup.initial_params)


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
    if getattr(store, "reset", False):  # a corrupt memory file was moved aside (memory-reset=true)
        sums[R.MEMORY_RESET] = 1
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
    if memory is not None:
        sums.update(memory_diagnostics(setup, tasks, w, memory, sums))
    sums[R.NUM_EXAMPLES] = sum(len(t.evaluation_split()[2]) for t in tasks)
    sums[R.PARTITION] = cid
    sums["unseen"] = int(unseen)
    return sums


def memory_diagnostics(setup: ExperimentSetup, tasks: list[Task], w: Params, memory: Params,
                       metrics: dict[str, float]) -> dict[str, float]:
    """How fresh a client's memory is, from its evaluation (docs/participation.md):

    * ``memory-gap``: ``memory-loss - loss`` of ``metrics`` (negative = the memory is the better
      starting point);
    * ``tracking-error`` (with ``evaluation.tracking_error``): mean over the client's tasks of
      ``||u_i - A_i(w)|| / ||A_i(w)||``, where ``A_i(w)`` is the adaptation the memory update
      averages: the algorithm's memory pattern (``algorithm.memory_pattern``, else its inner
      pattern) with step ``algorithm.alpha`` (times ``n_tasks / B`` under ``decay_to_w``), applied
      to ``w`` on the task's adaptation split (the examples evaluation adapts on). One adaptation
      per task, no meta-gradient.
    """
    out = {"memory-gap": metrics["memory-loss"] - metrics["loss"]}
    if not setup.config.evaluation.tracking_error:
        return out
    hp = setup.hyper
    alpha = hp.step.memory_alpha
    if hp.memory_policy == "decay_to_w":  # the unbiased step of the sampled tasks' update
        alpha *= len(tasks) / min(hp.tasks_per_step, len(tasks))
    errors = [float(tracking_error(setup.model, setup.loss_fn, w,
                                   {k: v[i] for k, v in memory.items()},
                                   *task.evaluation_split()[:2], hp.step.memory_pattern, alpha))
              for i, task in enumerate(tasks)]
    out["tracking-error"] = sum(errors) / len(errors)
    return out


def config_from_run_config(run_config: Any) -> Config:
    from fedmaml.config import config_from_flat

    return config_from_flat(dict(run_config), source="Flower run config")


# The app that ``flwr run .`` loads (see [tool.flwr.app.components] in pyproject.toml).
app = make_client_app()
