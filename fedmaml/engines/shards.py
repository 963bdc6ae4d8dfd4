"""One shard's side of the sharded engine: the assignment of clients, a shard's memory bank, the
worker that answers its part of each cohort, and the shards' replies joined.

The sharded engine (fedmaml/engines/sharded.py) gives shard ``k`` of ``N`` the clients whose id is
``k`` modulo ``N``: a fixed rule of the id alone, so a client's shard does not depend on who else is
sampled, the same client always finds its memory in the same actor, and a checkpoint (one bank
state for all clients) is split again for any other ``N`` on resume. Modulo spreads every sampled
cohort evenly over the shards whatever the sampling rule, since ids carry no order the shards see.

A :class:`ShardWorker` owns a :class:`~fedmaml.engines.vectorized.VectorizedGrid` whose memory bank
holds only its shard's clients (:class:`ShardBank`) and answers the messages the driver sends it
through that grid's own ``send_and_receive``: its part of a round's cohort is trained as one
vmapped call, its part of an evaluation panel evaluated client by client, exactly as in the
single-process vectorized engine. Nothing here imports Ray (the driver wraps the worker with
``ray.remote``), so all of it is tested without a cluster.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedmaml.config import Config
from fedmaml.core.params import Params
from fedmaml.engines.inprocess import claim_task_identity
from fedmaml.engines.memory_bank import MemoryBank
from fedmaml.engines.vectorized import VectorizedGrid
from fedmaml.federated import codec
from fedmaml.federated import records as R
from fedmaml.federated.bank_state import bank_state
from fedmaml.federated.client_app import make_client_app
from fedmaml.federated.server_round import needs_every_update, part_sum
from fedmaml.federated.setup import resolve_device, setup_for

#: A shard's answer to its part of a cohort: its reply, or why it gave none (its actor died).
ShardAnswer = Message | BaseException
#: A cohort train reply's stacked updates out of their record, per parameter a NumPy array of the
#: record's own values (:func:`detach_arrays`).
Detached = dict[str, np.ndarray]


def detach_arrays(reply: Message) -> Detached | None:
    """Take a cohort train reply's updates out of it as NumPy views of the record's bytes (no
    copy), ``None`` for any other reply. Ray moves NumPy arrays between processes through its
    object store without pickling them, where the record's bytes would be copied three times;
    :func:`merge_train` joins them into one record again with one copy."""
    if not reply.has_content() or R.FAILURES not in reply.content or R.ARRAYS not in reply.content:
        return None
    record = reply.content[R.ARRAYS]
    out = {k: codec.array_values(a)[0] for k, a in record.items()}
    del reply.content[R.ARRAYS]
    return out


def sum_train_reply(reply: Message, like: Params, weighting: str) -> Detached | None:
    """A cohort train reply's updates replaced by their part of the mean, in place: the rows the
    server round would use (decoded and checked as the strategy does, R.stack_from_cohort: not
    finite, or no examples, left out) summed in client-id order by server_round.part_sum; the reply
    loses ``arrays`` and gains ``parts`` (records.py). Returns the sum as NumPy arrays ``[1, ...]``
    (``None``, and the reply unchanged, for any other reply)."""
    if not reply.has_content() or R.FAILURES not in reply.content or R.ARRAYS not in reply.content:
        return None
    content = reply.content
    metrics = content[R.METRICS]
    ids = [int(c) for c in metrics[R.PARTITION]]
    counts = [int(c) for c in metrics[R.NUM_EXAMPLES]]
    stacked, errors = R.stack_from_cohort(content[R.ARRAYS], like,
                                          [f"update from client {c}" for c in ids])
    keep = [j for j in sorted(range(len(ids)), key=ids.__getitem__)
            if errors[j] is None and counts[j] > 0]
    if keep != list(range(len(ids))):  # else the rows are already the ones, in their order
        at = torch.tensor(keep, dtype=torch.int64)
        stacked = {k: v.index_select(0, at) for k, v in stacked.items()}
    part = part_sum(stacked, [counts[j] for j in keep], weighting)
    summed = set(keep)
    del content[R.ARRAYS]
    content[R.PARTS] = ConfigRecord({R.PART: [0 if j in summed else -1 for j in range(len(ids))],
                                     R.REJECTED: [str(errors[j] or "") for j in range(len(ids))],
                                     R.WEIGHTING: weighting})
    return {k: v.unsqueeze(0).numpy() for k, v in part.total.items()}


def shard_of(cid: int, shards: int) -> int:
    return cid % shards


def split(cids: Sequence[int], shards: int) -> list[list[int]]:
    """``cids`` per shard, each in the order given."""
    parts: list[list[int]] = [[] for _ in range(shards)]
    for c in cids:
        parts[c % shards].append(int(c))
    return parts


class ShardBank:
    """The memory bank of one shard's clients: a :class:`MemoryBank` of the shard's size behind the
    global client ids (client ``c`` is local row ``c // shards``), so an actor's index arrays are a
    shard's size, not the federation's (8 bytes a client: 80 MB for 10^7 clients)."""

    def __init__(self, like: Params, num_clients: int, shard: int, shards: int, **bank: Any
                 ) -> None:
        self.num_clients, self.shard, self.shards = num_clients, shard, shards
        self.local = MemoryBank(like, max(len(range(shard, num_clients, shards)), 1), **bank)

    def _local(self, cids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(cids, dtype=np.int64).reshape(-1)
        wrong = ids[(ids % self.shards != self.shard) | (ids < 0) | (ids >= self.num_clients)]
        if len(wrong):
            raise IndexError(f"client id(s) {wrong[:10].tolist()} are not in shard {self.shard} "
                             f"of {self.shards} (clients 0..{self.num_clients - 1})")
        return ids // self.shards

    def contains(self, cids: Sequence[int]) -> np.ndarray:
        return self.local.contains(self._local(cids))

    def read(self, cids: Sequence[int]) -> Params:
        return self.local.read(self._local(cids))

    def write(self, cids: Sequence[int], memory: Params) -> None:
        self.local.write(self._local(cids), memory)

    def client_ids(self) -> np.ndarray:
        return self.local.client_ids() * self.shards + self.shard

    @property
    def nbytes(self) -> int:
        return self.local.nbytes

    def state_dict(self) -> dict:
        """The shard's rows with their global client ids (a bank state of the whole federation)."""
        state = self.local.state_dict()
        return bank_state(self.num_clients, state["client_ids"] * self.shards + self.shard,
                          state["memory"])

    def load_state_dict(self, state: dict, where: str = "memory bank state") -> None:
        """Replace the contents by this shard's rows of ``state`` (a bank state of all clients:
        rows of other shards are left out)."""
        part = split_bank_state(state, self.shards)[self.shard]
        ids = part["client_ids"]
        self.local.load_state_dict(bank_state(self.local.num_clients, ids // self.shards,
                                              part["memory"]), where)

    def close(self) -> None:
        self.local.close()


def split_bank_state(state: dict, shards: int) -> list[dict]:
    """A bank state of all clients as one per shard (global ids kept, rows in their order)."""
    ids = state["client_ids"]
    out = []
    for k in range(shards):
        rows = torch.nonzero(ids % shards == k).flatten()
        out.append(bank_state(state["num_clients"], ids[rows],
                              {n: v[rows] for n, v in state["memory"].items()}))
    return out


def merge_bank_states(states: Sequence[dict | None], num_clients: int) -> dict | None:
    """The shards' bank states as one (shard by shard; ``None``: no shard keeps memories)."""
    states = [s for s in states if s is not None]
    if not states:
        return None
    names = list(states[0]["memory"])
    return bank_state(num_clients, torch.cat([s["client_ids"] for s in states]),
                      {n: torch.cat([s["memory"][n] for s in states]) for n in names})


# -- the worker (in its Ray actor) -----------------------------------------------------------------

#: What this actor works on now: ``shard``, ``round`` and ``kind`` (train, evaluate) of the message
#: it is answering; for log lines and for a user's code that wants to know (e.g. a fault test).
working_on: dict[str, Any] = {}


class ShardWorker:
    """Shard ``shard`` of ``shards``: its clients' memories and their training and evaluation."""

    def __init__(self, config: Config, num_nodes: int, shard: int, shards: int) -> None:
        claim_task_identity()  # replies take their sender from it (as in run_inprocess)
        self.shard = shard
        setup = setup_for(config)
        engine = config.engine
        bank = None
        if setup.algorithm.uses_memory:
            # each shard its own directory of memory-mapped files (several may share a host)
            directory = Path(engine.memory_dir) / f"shard-{shard}" if engine.memory_dir else None
            bank = ShardBank(setup.initial_params, setup.federation.num_clients, shard, shards,
                             budget_mb=engine.memory_budget_mb, directory=directory,
                             device=resolve_device(engine.device))
        self.grid = VectorizedGrid(config, make_client_app(config), num_nodes, bank)
        self.like = setup.initial_params
        #: the mean's weighting when the shard sends its part of the mean (a weighted sum: one
        #: update's bytes) instead of its rows: unless the round needs every update (the
        #: algorithm's own server rule, or differential privacy in any form)
        self.sums = (None if needs_every_update(config, setup.algorithm)
                     else config.federated.aggregation)
        self.busy_seconds = 0.0  # inside the grid, answering the driver's messages
        #: per training message answered: (round, seconds, CPU seconds of this thread); the CPU
        #: time is what the work costs whatever else shares the cores (docs/performance.md)
        self.train_calls: list[tuple[int, float, float]] = []

    def info(self) -> dict[str, Any]:
        """Where the shard runs: its process, host and Ray node (to find it, or to kill it)."""
        import ray  # only ever called inside a Ray actor

        return {"shard": self.shard, "pid": os.getpid(), "host": socket.gethostname(),
                "node_id": ray.get_runtime_context().get_node_id()}

    def handle(self, messages: list[Message], timeout: float | None
               ) -> list[tuple[str, Message, Detached | None]]:
        """The grid's replies, each with the id of the message it answers as the driver sent it
        (the grid gives messages ids of its own, as a SuperLink would) and, for a cohort's train
        reply, its updates taken out of it: their sum when the round takes the plain mean
        (:func:`sum_train_reply`), else every row (:func:`detach_arrays`)."""
        sent = [m.metadata.message_id for m in messages]
        config = messages[0].content.get(R.CONFIG) if messages[0].has_content() else None
        working_on.update(shard=self.shard, kind=messages[0].metadata.message_type,
                          round=int(config.get(R.ROUND, -1)) if config is not None else -1)
        start, cpu = time.perf_counter(), time.thread_time()
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        # the grid set new ids on these very message objects: map them back to the driver's
        driver_id = {m.metadata.message_id: s for m, s in zip(messages, sent)}
        out = [(driver_id[r.metadata.reply_to_message_id], r,
                sum_train_reply(r, self.like, self.sums) if self.sums else detach_arrays(r))
               for r in replies]
        self.busy_seconds += time.perf_counter() - start
        if working_on["kind"] == MessageType.TRAIN:
            self.train_calls.append((working_on["round"], time.perf_counter() - start,
                                     time.thread_time() - cpu))
        return out

    def memory_state(self) -> dict | None:
        return self.grid.memory_state()

    def load_memory_state(self, state: dict | None) -> None:
        """Replace the shard's memories by its rows of ``state`` (all clients' bank state)."""
        self.grid.load_memory_state(state)

    def stats(self) -> dict[str, Any]:
        """The shard's work and memory: cohorts, clients, stored memories, peak resident set."""
        s = self.grid.stats
        bank = self.grid.bank
        return {"shard": self.shard, "cohorts": s.cohorts, "vmapped_clients": s.vmapped_clients,
                "per_client": s.per_client, "fallbacks": s.fallbacks,
                "stored_clients": 0 if bank is None else len(bank.client_ids()),
                "bank_bytes": 0 if bank is None else bank.nbytes,
                "busy_seconds": self.busy_seconds, "train_calls": list(self.train_calls),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    def close(self) -> None:
        self.grid.close()


# -- replies ---------------------------------------------------------------------------------------

def _lost(cids: Sequence[int], shard: int, answer: ShardAnswer) -> list[tuple[int, str, str]]:
    """Every client of a shard that gave no usable reply, as a failure of kind ``error``."""
    if isinstance(answer, BaseException):
        first = (str(answer).splitlines() or [""])[0]  # Ray's own text runs to a page
        what = "did not answer in time" if isinstance(answer, TimeoutError) else "died"
        why = f"shard {shard}'s Ray actor {what} ({type(answer).__name__}: {first})"
    else:
        why = f"shard {shard}: {answer.error.reason}"
    return [(c, "error", why) for c in cids]


def merge_train(parts: Sequence[tuple[list[int], ShardAnswer, Detached | None]], like: Params
                ) -> RecordDict:
    """The shards' train replies (``(the shard's clients, its answer, its detached updates)`` in
    shard order) as the one cohort reply the strategy reads (records.py): rows joined shard by
    shard (the strategy orders them by client id before it averages, so the mean does not depend
    on the shards), or, when the shards sent their sums (:func:`sum_train_reply`), the sums as
    parts in shard order; the clients of a shard that gave no reply are failures of kind
    ``error``."""
    arrays: dict[str, list[np.ndarray]] = {k: [] for k in like}
    ids: list[int] = []
    columns: dict[str, list] = {}
    failures: list[tuple[int, str, str]] = []
    summed: dict[str, Any] | None = None  # the parts' columns, when the shards sent sums
    for shard, (cids, answer, detached) in enumerate(parts):
        if isinstance(answer, BaseException) or answer.has_error():
            failures += _lost(cids, shard, answer)
            continue
        content = answer.content
        failures += R.failures_from(content[R.FAILURES])
        metrics = content[R.METRICS]
        rows = [int(c) for c in metrics[R.PARTITION]]
        if not rows:
            continue
        sums = content.get(R.PARTS)
        if (columns and (set(metrics) != set(columns) or (sums is None) != (summed is None))) \
                or detached is None or list(detached) != list(like):
            failures += [(c, "malformed", f"shard {shard}'s reply has metrics {sorted(metrics)}, "
                          f"{'sums' if sums is not None else 'rows'} and updates "
                          f"{list(detached or {})}, the others' {sorted(columns)} and the model's "
                          f"{list(like)}") for c in rows]
            continue
        if sums is not None:  # its part is the next one of the joined sums
            summed = summed or {R.PART: [], R.REJECTED: [], R.WEIGHTING: sums[R.WEIGHTING]}
            at = len(arrays[next(iter(like))])
            summed[R.PART] += [p if p < 0 else p + at for p in sums[R.PART]]
            summed[R.REJECTED] += list(sums[R.REJECTED])
        for k, v in metrics.items():
            columns.setdefault(k, []).extend(v)
        ids += rows
        for k, v in detached.items():
            arrays[k].append(v)
    if ids:
        record = codec.encode_joined(arrays)
    else:
        record = codec.encode({k: v.new_zeros((0, *v.shape)) for k, v in like.items()})
    columns = columns or {R.PARTITION: [], R.NUM_EXAMPLES: [], "samples": [], "train-seconds": []}
    columns[R.PARTITION] = ids
    out = RecordDict({R.METRICS: MetricRecord(columns), R.FAILURES: R.failure_record(failures)})
    if summed is None:
        out[R.ARRAYS] = record
    else:
        out[R.PART_SUMS], out[R.PARTS] = record, ConfigRecord(summed)
    return out


def merge_evaluate(parts: Sequence[tuple[list[int], ShardAnswer]], panel: Sequence[int]
                   ) -> RecordDict:
    """The shards' evaluation replies as the one panel reply the strategy reads, rows and failures
    in the panel's order (the order a single process evaluates them in, so the panel's statistics
    are computed over the same sequence of values)."""
    rows: list[dict[str, Any]] = []
    failures: list[tuple[int, str, str]] = []
    for shard, (cids, answer) in enumerate(parts):
        if isinstance(answer, BaseException) or answer.has_error():
            failures += _lost(cids, shard, answer)
            continue
        content = answer.content
        rows += R.metric_rows(content[R.METRICS], content.get(R.ABSENT))
        failures += R.failures_from(content[R.FAILURES])
    at = {c: i for i, c in enumerate(panel)}
    rows.sort(key=lambda m: at.get(int(m[R.PARTITION]), len(at)))
    failures.sort(key=lambda f: at.get(f[0], len(at)))
    metrics, absent = R.metric_columns(rows)
    return RecordDict({R.METRICS: metrics, R.ABSENT: absent,
                       R.FAILURES: R.failure_record(failures)})


def shard_message(msg: Message, cids: list[int], first_node: int) -> Message:
    """``msg`` (a cohort instruction) for ``cids`` only: the same arrays and config, addressed to the
    first of them."""
    content = RecordDict({k: v for k, v in msg.content.items() if k != R.CONFIG})
    content[R.CONFIG] = ConfigRecord({**dict(msg.content[R.CONFIG]), R.COHORT: cids})
    meta = msg.metadata
    return Message(content, cids[0] + first_node, meta.message_type, group_id=meta.group_id)
