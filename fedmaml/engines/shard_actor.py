"""One shard of the sharded engine, as it runs inside its Ray actor.

A :class:`ShardWorker` owns a :class:`~fedmaml.engines.vectorized.VectorizedGrid` whose memory bank
holds only its shard's clients (:class:`~fedmaml.engines.shards.ShardBank`) and answers the
messages the driver sends it through that grid's own ``send_and_receive``: its part of a round's
cohort is trained as one vmapped call, its part of an evaluation panel evaluated client by client,
exactly as in the single-process vectorized engine. Nothing here imports Ray: the driver
(fedmaml/engines/sharded.py) wraps the class with ``ray.remote``.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from pathlib import Path
from typing import Any

from flwr.app import Message, MessageType

from fedmaml.config import Config
from fedmaml.engines.inprocess import claim_task_identity
from fedmaml.engines.shards import Detached, ShardBank, detach_arrays, sum_train_reply
from fedmaml.engines.vectorized import VectorizedGrid
from fedmaml.federated import records as R
from fedmaml.federated.client_app import make_client_app
from fedmaml.federated.server_round import needs_every_update
from fedmaml.federated.setup import resolve_device, setup_for


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
        (:func:`~fedmaml.engines.shards.sum_train_reply`), else every row
        (:func:`~fedmaml.engines.shards.detach_arrays`)."""
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
