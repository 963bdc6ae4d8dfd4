"""The vectorized engine: a Flower ``Grid`` that trains a round's cohort as one batched computation.

For the small models of meta-learning research a client step is a few milliseconds of tiny tensor
operations, so a per-client loop (one message, one ClientApp call per client) is bound by Python
and dispatch overhead. The grid announces ``takes_cohorts``: the strategy then sends it one train
message per round's cohort (``w_r`` once, the sampled ids, the round config; records.py) and gets
one reply back. For a cohort the grid

1. applies injected faults (the client library's decision, ``fedmaml.client.faults``), then
   groups the clients by shape: clients that initialise their memory apart from the others, and by
   number of tasks (at most ``engine.max_cohort_size`` clients per group);
2. draws each group's round data at once (``fedmaml.client.draw_cohort_round``: counter-based
   streams keyed by each client's ``(seed, id, round)``, so a client's data equals its own ClientApp
   draw) and reads the group's memories from a :class:`MemoryBank`;
3. runs the algorithm's :func:`~fedmaml.algorithms.client_update` under ``torch.func.vmap`` with
   ``w`` shared (:func:`fedmaml.client.cohort_update`), writes the memories back, clips (client-side
   clipping) and times the clients (speed model) with the client library;
4. replies with the stacked updates ``[clients, ...]`` (group by group), the per-client metrics as
   lists and the clients that failed (id, kind, reason).

A group of one, or one whose vmapped call fails, runs client by client through the client
library's :func:`~fedmaml.client.train_step` (the ClientApp's, with its memory in the bank) in the
same round. Per-client train messages (a strategy that does not send cohorts) are trained the same
way and answered one reply per client.

Evaluation rounds are batched the same way: the strategy sends one evaluate message for the whole
panel (seen and unseen ids) and gets one reply with every client's metrics as per-client lists and
the clients whose evaluation failed. The clients are evaluated one by one through the client library's
``evaluate_client`` (evaluation is not vmapped: it is a small share of a run), so the metrics
equal those of per-client evaluate messages, which the grid also answers. Other messages go to the
ClientApp.
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
from flwr.app import Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedmaml.algorithms import Hyper
from fedmaml.client import (CompiledUpdate, NoMemory, clip_client_updates, cohort_faults,
                            cohort_update, draw_cohort_round, evaluate_client, initial_for,
                            memory_init_mask, samples_drawn, stack_rounds, to_device,
                            train_columns, train_step, training_tasks)
from fedmaml.client.faults import failure_of, marker
from fedmaml.client.speed import simulated_seconds
from fedmaml.config import Config
from fedmaml.core.params import Params
from fedmaml.data.tasks import Task
from fedmaml.engines.allocator import retain_freed_memory
from fedmaml.engines.inprocess import (CLIENT_APP_ERROR, FIRST_CLIENT_NODE, InProcessGrid,
                                       error_reply, run_inprocess)
from fedmaml.engines.memory_bank import BankStore, MemoryBank
from fedmaml.federated import codec
from fedmaml.federated import records as R
from fedmaml.federated.instructions import evaluate_instruction, train_instruction, train_reply
from fedmaml.federated.setup import resolve_device, setup_for, use_torch_threads
from fedmaml.errors import ConfigError
from fedmaml.models.module import ModuleModel

__all__ = ["CohortResult", "CohortStats", "VectorizedGrid", "cohort_update", "refuse_unbatchable",
           "run_vectorized", "stack_rounds", "unbatchable_reason"]

log = logging.getLogger("fedmaml")


@dataclass
class CohortStats:
    """What the engine did, for benchmarks and tests: clients trained vmapped vs one by one."""

    vmapped_clients: int = 0
    cohorts: int = 0
    per_client: int = 0
    #: vmapped calls that failed (their cohort then ran client by client); the later cohorts of
    #: a kind vmap refused are not tried again, and show only in ``per_client``
    fallbacks: int = 0
    eval_cohorts: int = 0  # evaluation panels answered with one reply


@dataclass
class CohortResult:
    """A round's training of many clients: row ``j`` of ``delta`` and of every ``metrics`` list is
    client ``cids[j]``; ``failures`` are ``(client id, kind, reason)`` of the clients left out."""

    cids: list[int]
    delta: Params
    metrics: dict[str, list[float]]
    failures: list[tuple[int, str, str]]


class VectorizedGrid(InProcessGrid):
    """An in-process grid that trains each round's cohort through one vmapped client update."""

    #: The strategy sends this grid one train message per cohort (federated.strategy).
    takes_cohorts = True

    def __init__(self, config: Config, client_app: ClientApp, num_nodes: int,
                 bank: MemoryBank | None = None) -> None:
        super().__init__(client_app, num_nodes)
        self.cfg = config
        self.setup = setup_for(config)
        refuse_unbatchable(self.setup)
        engine = config.engine
        self.device = resolve_device(engine.device)
        use_torch_threads(engine)
        self.max_cohort = engine.max_cohort_size or None
        retain_freed_memory()  # cohort tensors are large: reuse freed blocks (engines/allocator.py)
        if bank is None and self.setup.algorithm.uses_memory:
            bank = MemoryBank(self.setup.initial_params, self.setup.federation.num_clients,
                              budget_mb=engine.memory_budget_mb,
                              directory=engine.memory_dir or None, device=self.device)
        self.bank = bank
        self.stats = CohortStats()
        #: kinds of cohort, ``(fresh, tasks per client)``, whose update vmap refused: their later
        #: cohorts run one client at a time without trying it batched again; and vmap's reasons
        #: (each said once)
        self.unbatched: set[tuple[bool, int]] = set()
        self._refusals: set[str] = set()
        self._update = CompiledUpdate(  # engine.compile: torch.compile'd on first use
            lambda hp, w, memory, data, initial: cohort_update(
                self.setup.algorithm, self.setup.model, self.setup.loss_fn, hp, w, memory, data,
                initial),
            engine.compile, "vectorized engine")

    def close(self) -> None:
        if self.bank is not None:
            self.bank.close()

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
        replies: dict[int, tuple[Message, float]] = {}
        for i, msg in enumerate(messages):
            kind = msg.metadata.message_type
            if kind == MessageType.TRAIN and R.cohort_ids(msg) is not None:
                replies[i] = (self._train_cohort_message(msg, timeout), 0.0)
            elif kind == MessageType.EVALUATE and R.cohort_ids(msg) is not None:
                replies[i] = (self._evaluate_cohort_message(msg, timeout), 0.0)
            else:
                (train if kind == MessageType.TRAIN else
                 evaluate if kind == MessageType.EVALUATE else other).append(i)
        if train:
            replies.update(self._train({i: messages[i] for i in train}, timeout))
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
    def _train_cohort_message(self, msg: Message, timeout: float | None) -> Message:
        """One message for a cohort -> one reply: the stacked updates, per-client metrics as lists
        and the failed clients by id (records.py)."""
        set_message_id(msg)
        try:
            w, server_round, hp = train_instruction(msg, self.setup, self.device)
            cids = [int(c) for c in R.cohort_ids(msg)]
        except Exception as e:  # noqa: BLE001 - a bad instruction fails the whole cohort
            return error_reply(msg, e)
        result = self.train_clients(w, hp, server_round, cids, timeout)
        return Message(RecordDict({R.ARRAYS: codec.encode(result.delta),
                                   R.METRICS: MetricRecord({R.PARTITION: result.cids,
                                                            **result.metrics}),
                                   R.FAILURES: R.failure_record(result.failures)}), reply_to=msg)

    def _train(self, messages: dict[int, Message], timeout: float | None
               ) -> dict[int, tuple[Message, float]]:
        """Per-client train messages (from a strategy that does not send cohorts): grouped by
        instruction, trained as cohorts, answered one reply per client."""
        groups: dict[tuple, list[int]] = {}
        keys: dict[int, tuple] = {}  # a round's messages usually share one content object
        for i, msg in messages.items():
            set_message_id(msg)
            key = keys.get(id(msg.content))
            if key is None:
                config = msg.content.get(R.CONFIG, {})
                key = keys[id(msg.content)] = (
                    id(msg.content.get(R.ARRAYS)),
                    tuple(sorted((k, repr(v)) for k, v in dict(config).items())))
            groups.setdefault(key, []).append(i)
        replies: dict[int, tuple[Message, float]] = {}
        for indices in groups.values():
            group = {i: messages[i] for i in indices}
            first = next(iter(group.values()))
            try:
                w, server_round, hp = train_instruction(first, self.setup, self.device)
            except Exception as e:  # noqa: BLE001 - each client reports the bad instruction
                replies.update({i: (error_reply(m, e), 0.0) for i, m in group.items()})
                continue
            by_cid = {m.metadata.dst_node_id - FIRST_CLIENT_NODE: i for i, m in group.items()}
            result = self.train_clients(w, hp, server_round, list(by_cid), None)
            records = codec.encode_rows(result.delta)
            for j, cid in enumerate(result.cids):
                i = by_cid[cid]
                m = MetricRecord({R.PARTITION: cid, **{k: v[j] for k, v in result.metrics.items()}})
                replies[i] = (train_reply(messages[i], records[j], m),
                              result.metrics["train-seconds"][j])
            for cid, _, reason in result.failures:
                i = by_cid[cid]
                replies[i] = (Message(Error(code=CLIENT_APP_ERROR, reason=reason),
                                      reply_to=messages[i]), 0.0)
        return replies

    def train_clients(self, w: Params, hp: Hyper, server_round: int, cids: list[int],
                      timeout: float | None) -> CohortResult:
        """Train ``cids`` for a round: grouped into cohorts of equal shapes (clients that initialise
        their memory apart; at most ``engine.max_cohort_size`` each), each drawn and updated with a
        few batched calls. A client that raises, or whose share of its cohort's time exceeds
        ``timeout``, is left out and listed in the failures, as are injected faults (an injected
        straggler trains, its memory moves, but it is listed as late)."""
        setup = self.setup
        injected = cohort_faults(self.cfg, cids, server_round)  # the client library's decision
        cids, late, failures = injected.training, injected.late, injected.failures
        has = (self.bank.contains(cids) if self.bank is not None and cids
               else [False] * len(cids))
        fresh_of = memory_init_mask(setup.algorithm.uses_memory, hp, has).tolist()
        groups: dict[tuple[bool, int], list[int]] = {}
        tasks = self._tasks_of(cids)
        for cid, fresh in zip(cids, fresh_of):
            try:
                tasks[cid] = tasks.get(cid) or training_tasks(setup, cid)
                groups.setdefault((fresh, len(tasks[cid])), []).append(cid)
            except Exception as e:  # noqa: BLE001 - the client fails, the cohort goes on
                failures.append(failure_of(cid, e))
        parts: list[tuple[list[int], Params, dict[str, list[float]]]] = []
        for kind, members in groups.items():
            size = self.max_cohort or len(members)
            for at in range(0, len(members), size):
                chunk = members[at:at + size]
                part = (self._train_vmapped(w, hp, server_round, chunk, kind,
                                            [tasks[c] for c in chunk])
                        if len(chunk) > 1 and kind not in self.unbatched else None)
                parts += [part] if part is not None else [
                    p for p in (self._train_one(w, hp, server_round, cid, failures) for cid in chunk)
                    if p is not None]
        return _assemble(parts, failures, timeout, setup.initial_params, late)

    def _tasks_of(self, cids: list[int]) -> dict[int, list[Task]]:
        """The training clients' tasks, built in one batch where the family can; on any error
        none (each client then asks for its own and reports its own error)."""
        fed = self.setup.federation
        try:
            ids = [c for c in cids if 0 <= c < fed.num_clients]
            return dict(zip(ids, fed.clients_tasks(ids)))
        except Exception:  # noqa: BLE001 - client by client below
            return {}

    def _train_vmapped(self, w: Params, hp: Hyper, server_round: int, cids: list[int],
                       kind: tuple[bool, int], tasks: list[list[Task]]
                       ) -> tuple[list[int], Params, dict[str, list[float]]] | None:
        """One cohort of ``kind`` (``(fresh, tasks per client)``) through one ``cohort_update``
        (``None``: it cannot run batched). When vmap itself refuses the update, every later cohort
        of that kind would fail alike: it is remembered (``unbatched``) and said once."""
        setup, start = self.setup, time.perf_counter()
        fresh, update = kind[0], False
        try:
            tasks, data = draw_cohort_round(self.cfg, setup, cids, hp, server_round, fresh, tasks)
            memory = None
            if self.bank is not None and not fresh:
                memory = to_device(self.bank.read(cids), self.device)
            update = True
            delta, memory, metrics = self._update(hp, w, memory, data.to(self.device),
                                                  initial_for(setup, hp, self.device))
        except Exception as e:  # noqa: BLE001 - e.g. an op vmap cannot batch: go one by one
            self.stats.fallbacks += 1
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if update and vmap_refused(e):
                self.unbatched.add(kind)
                if why not in self._refusals:  # the same reason for another kind: said already
                    self._refusals.add(why)
                    log.warning("vectorized engine: a cohort of %d clients could not run "
                                "batched: torch.func.vmap refuses the client update (algorithm "
                                "%s, model %s: %s); this run trains such cohorts one client at a "
                                "time from now on, as the inprocess engine does (docs/custom.md "
                                "lists what vmap cannot batch)", len(cids),
                                self.cfg.algorithm.name,
                                getattr(setup.model, "name", self.cfg.model.name), why)
            else:  # perhaps one client's data or numbers: the next cohort tries batched again
                log.warning("vectorized engine: a cohort of %d clients could not run batched "
                            "(%s); running them one by one", len(cids), why)
            return None
        if memory is not None:
            self.bank.write(cids, memory)
        delta = clip_client_updates(self.cfg, delta)
        n = len(cids)
        # each client's share of the cohort's time, times its simulated speed
        seconds = simulated_seconds(self.cfg.participation, self.cfg.seed, cids,
                                    (time.perf_counter() - start) / n).tolist()
        columns = train_columns(tasks, [samples_drawn(data) // n] * n, seconds, metrics)
        self.stats.cohorts += 1
        self.stats.vmapped_clients += n
        return cids, delta, columns

    def _train_one(self, w: Params, hp: Hyper, server_round: int, cid: int,
                   failures: list[tuple[int, str, str]]
                   ) -> tuple[list[int], Params, dict[str, list[float]]] | None:
        """The per-client path: the client library's train step (the ClientApp's), with the memory
        in the bank."""
        self.stats.per_client += 1
        try:
            delta, m = train_step(self.cfg, self.setup, cid, w, hp, server_round,
                                  NoMemory() if self.bank is None else BankStore(self.bank, cid),
                                  self.device)
        except Exception as e:  # noqa: BLE001 - the client fails, the cohort goes on
            failures.append(failure_of(cid, e))
            return None
        columns = {k: [v] for k, v in m.items() if k != R.PARTITION}
        return [cid], {k: v.unsqueeze(0) for k, v in delta.items()}, columns

    # -- evaluation -----------------------------------------------------------------------------
    def _evaluate_cohort_message(self, msg: Message, timeout: float | None) -> Message:
        """One message for an evaluation panel -> one reply: every client evaluated as its own
        evaluate message would be, the metrics as per-client lists and the failed clients by id
        (records.py). A client whose evaluation exceeds ``timeout`` is listed as late."""
        set_message_id(msg)
        self.stats.eval_cohorts += 1
        try:
            w, pattern = evaluate_instruction(msg, self.setup)
            cids = [int(c) for c in R.cohort_ids(msg)]
        except Exception as e:  # noqa: BLE001 - a bad instruction fails the whole panel
            return error_reply(msg, e)
        rows: list[dict[str, float]] = []
        failures: list[tuple[int, str, str]] = []
        for cid in cids:
            start = time.perf_counter()
            try:
                metrics = self._evaluate_client(cid, w, pattern)
            except Exception as e:  # noqa: BLE001 - the client fails, the panel goes on
                failures.append(failure_of(cid, e))
                continue
            if timeout is not None and time.perf_counter() - start > timeout:
                late = f"client {cid} took longer than the round timeout ({timeout} s)"
                failures.append((cid, "timeout", late))
            else:
                rows.append(metrics)
        metrics, absent = R.metric_columns(rows)
        return Message(RecordDict({R.METRICS: metrics, R.ABSENT: absent,
                                   R.FAILURES: R.failure_record(failures)}), reply_to=msg)

    def _evaluate(self, msg: Message) -> tuple[Message, float]:
        set_message_id(msg)
        start = time.perf_counter()
        cid = msg.metadata.dst_node_id - FIRST_CLIENT_NODE
        try:
            w, pattern = evaluate_instruction(msg, self.setup)
            metrics = self._evaluate_client(cid, w, pattern)
            reply = Message(RecordDict({R.METRICS: MetricRecord(metrics)}), reply_to=msg)
        except Exception as e:  # noqa: BLE001 - reported to the strategy as an error reply
            reply = error_reply(msg, e)
        return reply, time.perf_counter() - start

    def _evaluate_client(self, cid: int, w: Params, pattern: Any) -> dict[str, float]:
        """Client ``cid``'s evaluation (the client library's ``evaluate_client``) with its memory."""
        trains = cid < self.setup.federation.num_clients
        # evaluation runs on the host: the memory comes out of the bank there
        store = (BankStore(self.bank, cid, "cpu") if trains and self.bank is not None
                 else NoMemory())
        return evaluate_client(self.setup, cid, w, store, pattern)


_MESSAGE_IDS = itertools.count(1)
_ID_PREFIX = uuid.uuid4().hex[:16]  # unique per process; a counter makes the rest (uuid4 is slower)


def set_message_id(msg: Message) -> None:
    # Replies point at their instruction's id, which a SuperLink would have assigned.
    msg.metadata.__dict__["_message_id"] = f"{_ID_PREFIX}{next(_MESSAGE_IDS):016x}"


def _assemble(parts: list[tuple[list[int], Params, dict[str, list[float]]]],
              failures: list[tuple[int, str, str]], timeout: float | None, like: Params,
              stragglers: Iterable[int] = ()) -> CohortResult:
    """The parts' rows joined (in the order they were trained: the order of rows only changes the
    rounding of their average); clients over ``timeout``, and injected ``stragglers``, join the
    failures."""
    joined = [c for part_cids, _, _ in parts for c in part_cids]
    columns = {k: [v for _, _, cols in parts for v in cols[k]] for k in (parts[0][2] if parts else
               (R.NUM_EXAMPLES, "samples", "train-seconds"))}
    stragglers = set(stragglers)
    late = [j for j, s in enumerate(columns["train-seconds"])
            if joined[j] in stragglers or (timeout is not None and s > timeout)]
    if not parts:
        delta = {k: v.new_zeros((0, *v.shape)) for k, v in like.items()}
    elif len(parts) == 1:
        delta = parts[0][1]
    else:
        delta = {k: torch.cat([p[1][k] for p in parts]) for k in like}
    if late:
        failures = failures + [(joined[j], "timeout", f"client {joined[j]} took longer than the "
                                f"round timeout ({timeout} s)"
                                + (f" {marker('straggle')}" if joined[j] in stragglers else ""))
                               for j in late]
        keep = sorted(set(range(len(joined))) - set(late))
        at = torch.tensor(keep, dtype=torch.int64)
        delta = {k: v.index_select(0, at.to(v.device)) for k, v in delta.items()}
        columns = {k: [v[j] for j in keep] for k, v in columns.items()}
        joined = [joined[j] for j in keep]
    return CohortResult(joined, delta, columns, failures)


def vmap_refused(e: BaseException) -> bool:
    """Whether ``e`` is ``torch.func.vmap`` refusing an operation of the batched function (an
    ``.item()``, a branch on a tensor's value, an op without a batching rule, a non-tensor
    output...): the same function then fails so for every batch, whatever the data. Anything else
    (a client's data, its numbers) may be a failure of that batch alone."""
    text = str(e)
    return (text.startswith("vmap") or "Batching rule not implemented" in text
            or "Tensor that doesn't have storage" in text)  # .numpy(), .tolist() of a batched one


def unbatchable_reason(setup: Any) -> str | None:
    """Why ``torch.func.vmap`` cannot batch the run's model across clients (None: it can)."""
    model = setup.model
    if not isinstance(model, ModuleModel):
        return None  # a hand-written StagedModel (the low-level API): its author vouches for vmap
    return model.vmap_problem(setup.federation.input_shape)


def refuse_unbatchable(setup: Any) -> None:
    """A user's module that ``vmap`` cannot batch (data-dependent Python control flow, in-place
    changes of its inputs, ...) is refused before the run, with the reason and the alternative."""
    problem = unbatchable_reason(setup)
    if problem is not None:
        raise ConfigError(f"engine.name: the vectorized engine cannot batch {setup.model.name} "
                          f"across clients with torch.func.vmap ({problem}); use engine.name: "
                          "inprocess or ray, which run clients one by one, or make the module's "
                          "forward free of data-dependent branches and in-place changes of its "
                          "inputs (docs/custom.md)")


def run_vectorized(server_app: ServerApp, client_app: ClientApp, num_nodes: int, config: Config
                   ) -> VectorizedGrid:
    """Run ``server_app`` on a :class:`VectorizedGrid`; return the grid (its ``bank`` holds the
    memories; call ``close()`` when done with it)."""
    grid = VectorizedGrid(config, client_app, num_nodes)
    run_inprocess(server_app, client_app, num_nodes, grid)
    return grid
