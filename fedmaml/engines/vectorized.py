"""The vectorized engine: a Flower ``Grid`` that trains a round's cohort as one batched computation.

For the small models of meta-learning research a client step is a few milliseconds of tiny tensor
operations, so a per-client loop (one message, one ClientApp call per client) is bound by Python
and dispatch overhead. This grid receives a round's train messages at once and:

1. groups them by instruction (the same meta-model and round config);
2. applies injected faults (``fedmaml.federated.faults``, as the ClientApp does), then draws each
   client's round data exactly as the ClientApp does (``draw_client_round``: the client's
   own ``(seed, id, round)`` generator), reads the cohort's memories from a :class:`MemoryBank`;
3. groups clients whose inputs have the same shapes (clients needing memory initialisation form their
   own cohort; ragged clients their own), stacks them, and runs the algorithm's
   :func:`~fedmaml.algorithms.client_update` under ``torch.func.vmap`` with ``w`` shared;
4. writes the memories back and returns one reply per client, with the ClientApp's record keys and
   metrics, so the ServerApp and the Strategy are unchanged.

A cohort of one, or one whose vmapped call fails, runs client by client through the ClientApp's own
:func:`~fedmaml.federated.client_app.train_client` (with its memory in the bank) in the same round.
Evaluate messages run client by client (``evaluate_client``), other messages go to the ClientApp.
Replies come back in message order, so the server aggregates in the same order as in-process.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.supercore.task_identity import TaskIdentity

from fedmaml.algorithms import Algorithm, Hyper, RoundData, client_update
from fedmaml.core.losses import LossFn
from fedmaml.core.params import Params
from fedmaml.core.privacy import clip_stacked
from fedmaml.data.tasks import Task
from fedmaml.engines.allocator import retain_freed_memory
from fedmaml.engines.inprocess import (CLIENT_APP_ERROR, FIRST_CLIENT_NODE, SERVER_NODE_ID,
                                       InProcessGrid)
from fedmaml.engines.memory_bank import BankStore, MemoryBank
from fedmaml.federated import codec, faults
from fedmaml.federated import records as R
from fedmaml.federated.client_app import (draw_client_round, evaluate_client,
                                          evaluate_instruction, initial_for, needs_memory_init,
                                          to_device, train_client, train_instruction,
                                          train_metrics, train_reply)
from fedmaml.federated.setup import resolve_device, setup_for
from fedmaml.models.base import StagedModel

log = logging.getLogger("fedmaml")


def cohort_update(algorithm: Algorithm, model: StagedModel, loss_fn: LossFn, hp: Hyper, w: Params,
                  memory: Params | None, data: RoundData, initial: Params | None = None
                  ) -> tuple[Params, Params | None, dict[str, torch.Tensor]]:
    """:func:`~fedmaml.algorithms.client_update` vmapped over a cohort.

    ``w`` is shared; ``memory`` (``[C, tasks, ...]``, or ``None`` when the cohort initialises its
    memories or the algorithm keeps none) and every tensor of ``data`` are stacked along a leading
    client axis. ``initial`` (shared) is the initial meta-model of ``memory_init: initial_model``.
    Returns stacked deltas, memories (or ``None``) and metrics (``[C]`` each).
    """
    def one(w_, memory_, task_index, support, query, extra, init):
        delta, new_memory, metrics = client_update(
            algorithm, model, loss_fn, hp, w_, memory_,
            RoundData(task_index, support, query, extra, init), initial)
        return delta, ({} if new_memory is None else new_memory), metrics

    batched = lambda x: None if x is None else 0  # noqa: E731 - None inputs are not mapped
    in_dims = (None, batched(memory), 0, 0, 0, batched(data.extra), batched(data.init))
    delta, new_memory, metrics = torch.func.vmap(one, in_dims=in_dims)(
        w, memory, data.task_index, data.support, data.query, data.extra, data.init)
    return delta, (new_memory or None), metrics


def stack_rounds(rounds: list[RoundData]) -> RoundData:
    """Clients' round data (equal shapes) stacked along a new leading client axis."""
    def batch(get):
        parts = [get(r) for r in rounds]
        if parts[0] is None:
            return None
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    return RoundData(torch.stack([r.task_index for r in rounds]), batch(lambda r: r.support),
                     batch(lambda r: r.query), batch(lambda r: r.extra), batch(lambda r: r.init))


def round_signature(data: RoundData, num_tasks: int, fresh: bool) -> tuple:
    """Clients with the same signature can be stacked into one cohort."""
    tensors = [data.task_index, *(t for b in (data.support, data.query, data.extra, data.init)
                                  for t in (b or (None, None)))]
    return (fresh, num_tasks, tuple(None if t is None else (tuple(t.shape), t.dtype)
                                    for t in tensors))


@dataclass
class _Client:
    msg: Message
    cid: int
    tasks: list[Task]
    data: RoundData
    fresh: bool
    draw_seconds: float


class _NoMemory:
    """The memory store of algorithms that keep no memory."""

    def load(self) -> None:
        return None

    def save(self, memory: Params) -> None:  # pragma: no cover - never called without memory
        raise RuntimeError("this algorithm keeps no memory")


@dataclass
class CohortStats:
    """What the engine did, for benchmarks and tests: clients trained vmapped vs one by one."""

    vmapped_clients: int = 0
    cohorts: int = 0
    per_client: int = 0
    fallbacks: int = 0  # cohorts whose vmapped call failed and ran client by client


class VectorizedGrid(InProcessGrid):
    """An in-process grid that trains each round's cohort through one vmapped client update."""

    def __init__(self, config: Any, client_app: ClientApp, num_nodes: int,
                 bank: MemoryBank | None = None, run_id: int = 1) -> None:
        super().__init__(client_app, num_nodes, run_id)
        self.cfg = config
        self.setup = setup_for(config)
        self.device = resolve_device(config.engine.device)
        engine = config.engine
        if engine.torch_threads and torch.get_num_threads() != engine.torch_threads:
            torch.set_num_threads(engine.torch_threads)
        self.max_cohort = engine.max_cohort_size or None
        retain_freed_memory()  # cohort tensors are large: reuse freed blocks (engines/allocator.py)
        if bank is None and self.setup.algorithm.uses_memory:
            bank = MemoryBank(self.setup.initial_params, self.setup.federation.num_clients,
                              budget_mb=engine.memory_budget_mb,
                              directory=engine.memory_dir or None)
        self.bank = bank
        self.stats = CohortStats()
        self._nodes: dict[int, int] | None = None

    def partition_nodes(self) -> dict[int, int]:
        # Built once: the strategy asks every round, and with a million clients building the
        # mapping costs more than a whole round of a small cohort.
        if self._nodes is None:
            self._nodes = super().partition_nodes()
        return self._nodes

    def store(self, cid: int) -> BankStore | _NoMemory:
        """Client ``cid``'s memory store (a view of the bank)."""
        return _NoMemory() if self.bank is None else BankStore(self.bank, cid)

    def close(self) -> None:
        if self.bank is not None:
            self.bank.close()

    # -- checkpoints (fedmaml/federated/checkpoint.py): the bank as a whole ------------------------
    def memory_state(self) -> dict | None:
        return None if self.bank is None else self.bank.state_dict()

    def load_memory_state(self, state: dict | None) -> None:
        if self.bank is not None and state is not None:
            self.bank.load_state_dict(state, "the checkpoint's memory bank")

    # -- Grid API -------------------------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        train, evaluate, other = [], [], []
        for i, msg in enumerate(messages):
            kind = msg.metadata.message_type
            (train if kind == MessageType.TRAIN else
             evaluate if kind == MessageType.EVALUATE else other).append(i)
        replies: dict[int, tuple[Message, float]] = {}
        if train:
            replies.update(self._train({i: messages[i] for i in train}))
        for i in evaluate:
            replies[i] = self._evaluate(messages[i])
        if other:  # discovery, pattern selection...: the ClientApp itself, as in-process
            for i, reply in zip(other, super().send_and_receive([messages[i] for i in other])):
                replies[i] = (reply, 0.0)
        # As in-process: a reply that took longer than the timeout arrived too late. A vmapped
        # client's time is its share of its cohort's.
        return [reply for i, (reply, seconds) in sorted(replies.items())
                if timeout is None or seconds <= timeout]

    # -- training -------------------------------------------------------------------------------
    def _train(self, messages: dict[int, Message]) -> dict[int, tuple[Message, float]]:
        groups: dict[tuple, list[int]] = {}
        keys: dict[int, tuple] = {}  # a round's messages usually share one content object
        for i, msg in messages.items():
            _set_message_id(msg)
            key = keys.get(id(msg.content))
            if key is None:
                config = msg.content.get(R.CONFIG, {})
                key = keys[id(msg.content)] = (
                    id(msg.content.get(R.ARRAYS)),
                    tuple(sorted((k, repr(v)) for k, v in dict(config).items())))
            groups.setdefault(key, []).append(i)
        replies: dict[int, tuple[Message, float]] = {}
        for indices in groups.values():
            replies.update(self._train_group({i: messages[i] for i in indices}))
        return replies

    def _train_group(self, messages: dict[int, Message]) -> dict[int, tuple[Message, float]]:
        setup, replies = self.setup, {}
        first = next(iter(messages.values()))
        try:
            w, server_round, hp = train_instruction(first, setup, self.device)
        except Exception:  # noqa: BLE001 - each client reports the bad instruction itself
            return {i: self._train_one(msg) for i, msg in messages.items()}
        cohorts: dict[tuple, list[tuple[int, _Client]]] = {}
        stragglers: list[int] = []
        for i, msg in messages.items():
            start = time.perf_counter()
            cid = msg.metadata.dst_node_id - FIRST_CLIENT_NODE
            fault = faults.client_fault(self.cfg, cid, server_round)  # as train_client decides
            if fault == "fail":
                replies[i] = (_error_reply(msg, faults.fail(cid, server_round)), 0.0)
                continue
            if fault == "dropout":
                replies[i] = (faults.dropout_reply(msg, cid), 0.0)
                continue
            if fault == "straggle":
                stragglers.append(i)
            try:
                has_memory = self.bank is not None and bool(self.bank.contains([cid])[0])
                fresh = needs_memory_init(setup, hp, has_memory)
                tasks, data = draw_client_round(self.cfg, setup, cid, hp, server_round, fresh)
            except Exception as e:  # noqa: BLE001 - reported to the strategy as an error reply
                replies[i] = (_error_reply(msg, e), time.perf_counter() - start)
                continue
            client = _Client(msg, cid, tasks, data, fresh, time.perf_counter() - start)
            cohorts.setdefault(round_signature(data, len(tasks), fresh), []).append((i, client))
        for members in cohorts.values():
            size = self.max_cohort or len(members)
            for at in range(0, len(members), size):
                replies.update(self._train_cohort(w, hp, members[at:at + size]))
        for i in stragglers:  # trained (memory written), but the reply comes after the deadline
            reply, seconds = replies[i]
            if not reply.has_error():
                replies[i] = (faults.mark_late(reply), seconds)
        return replies

    def _train_cohort(self, w: Params, hp: Hyper, members: list[tuple[int, _Client]]
                      ) -> dict[int, tuple[Message, float]]:
        if len(members) > 1:
            try:
                return self._train_vmapped(w, hp, members)
            except Exception as e:  # noqa: BLE001 - e.g. an op vmap cannot batch: go one by one
                self.stats.fallbacks += 1
                log.warning("vectorized engine: a cohort of %d clients could not run batched "
                            "(%s: %s); running them one by one", len(members), type(e).__name__, e)
        return {i: self._train_one(c.msg) for i, c in members}

    def _train_vmapped(self, w: Params, hp: Hyper, members: list[tuple[int, _Client]]
                       ) -> dict[int, tuple[Message, float]]:
        setup, start = self.setup, time.perf_counter()
        clients = [c for _, c in members]
        cids = [c.cid for c in clients]
        memory = None
        if self.bank is not None and not clients[0].fresh:
            memory = to_device(self.bank.read(cids), self.device)
        data = stack_rounds([c.data for c in clients]).to(self.device)
        delta, memory, metrics = cohort_update(setup.algorithm, setup.model, setup.loss_fn, hp, w,
                                               memory, data, initial_for(setup, hp, self.device))
        if memory is not None:
            self.bank.write(cids, memory)
        if self.cfg.privacy.clipping == "client":  # as each client's ClientApp would (client_app.py)
            delta, _ = clip_stacked(delta, self.cfg.privacy.clipping_norm)
        values = {k: v.tolist() for k, v in metrics.items()}
        records = codec.encode_rows(delta)
        share = (time.perf_counter() - start) / len(clients)
        replies = {}
        for j, (i, c) in enumerate(members):
            seconds = share + c.draw_seconds
            m = train_metrics(c.cid, c.tasks, c.data, {k: v[j] for k, v in values.items()},
                              seconds)
            replies[i] = (train_reply(c.msg, records[j], m), seconds)
        self.stats.cohorts += 1
        self.stats.vmapped_clients += len(clients)
        return replies

    def _train_one(self, msg: Message) -> tuple[Message, float]:
        """The per-client path: the ClientApp's own train function, with the memory in the bank."""
        start = time.perf_counter()
        cid = msg.metadata.dst_node_id - FIRST_CLIENT_NODE
        self.stats.per_client += 1
        try:
            reply = train_client(msg, self.cfg, self.setup, cid, self.store(cid))
        except Exception as e:  # noqa: BLE001 - reported to the strategy as an error reply
            reply = _error_reply(msg, e)
        return reply, time.perf_counter() - start

    # -- evaluation -----------------------------------------------------------------------------
    def _evaluate(self, msg: Message) -> tuple[Message, float]:
        _set_message_id(msg)
        start = time.perf_counter()
        cid = msg.metadata.dst_node_id - FIRST_CLIENT_NODE
        try:
            w, pattern = evaluate_instruction(msg, self.setup)
            trains = cid < self.setup.federation.num_clients
            store = self.store(cid) if trains else _NoMemory()
            metrics = evaluate_client(self.setup, cid, w, store, pattern)
            reply = Message(RecordDict({R.METRICS: MetricRecord(metrics)}), reply_to=msg)
        except Exception as e:  # noqa: BLE001 - reported to the strategy as an error reply
            reply = _error_reply(msg, e)
        return reply, time.perf_counter() - start


_MESSAGE_IDS = itertools.count(1)
_ID_PREFIX = uuid.uuid4().hex[:16]  # unique per process; a counter makes the rest (uuid4 is slower)


def _set_message_id(msg: Message) -> None:
    # Replies point at their instruction's id, which a SuperLink would have assigned.
    msg.metadata.__dict__["_message_id"] = f"{_ID_PREFIX}{next(_MESSAGE_IDS):016x}"


def _error_reply(msg: Message, e: Exception) -> Message:
    return Message(Error(code=CLIENT_APP_ERROR, reason=f"{type(e).__name__}: {e}"), reply_to=msg)


def run_vectorized(server_app: ServerApp, client_app: ClientApp, num_nodes: int, config: Any,
                   bank: MemoryBank | None = None) -> VectorizedGrid:
    """Run ``server_app`` on a :class:`VectorizedGrid`; return the grid (its ``bank`` holds the
    memories; call ``close()`` when done with it)."""
    # As in run_inprocess: messages take their ids from the process's task identity.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SERVER_NODE_ID
    grid = VectorizedGrid(config, client_app, num_nodes, bank)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                             run_config={}))
    return grid
