"""``MetaStrategy``: the server side of fedmaml as a Flower ``Strategy`` (ALGORITHMS.md §5).

* **Sampling** by stable client id (partition id) with a seeded RNG, never by transport node ids:
  cross-device samples a fraction or count of clients per round (without replacement, O(k) work
  whatever the number of clients); cross-silo takes every silo every round.
* **Aggregation**: example-weighted or uniform mean of the clients' updates, then a server
  optimizer (SGD, momentum, Adam).
* **Failures**: error replies, malformed replies and missing replies (timeouts) are counted and
  logged; the update is applied when at least ``min_replies`` valid replies arrived.
* **Evaluation** every ``eval_every`` rounds (and before the first and after the last round): a
  seeded sample of clients that have trained, and every unseen client; per-client metrics are
  summarised as mean, std and p10/p50/p90 (ALGORITHMS.md §7).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedmaml.core.params import Params
from fedmaml.core.server import ServerOptimizer, aggregate
from fedmaml.errors import MessageError
from fedmaml.federated import records as R
from fedmaml.federated.pattern_selection import PatternSelector
from fedmaml.federated.setup import ExperimentSetup

log = logging.getLogger("fedmaml")

TRAIN_METRICS = ("loss-before", "loss-after")


def sample_clients(seed: int, server_round: int, num_clients: int, k: int) -> list[int]:
    """``k`` distinct client ids for a round, a function of (seed, round) only."""
    rng = np.random.default_rng([seed, server_round, 0xC1])
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


def summarize(values: list[float], weights: list[float]) -> dict[str, float]:
    v, w = np.asarray(values, dtype=float), np.asarray(weights, dtype=float)
    mean = float(np.average(v, weights=w)) if w.sum() > 0 else float(v.mean())
    p10, p50, p90 = (float(x) for x in np.percentile(v, [10, 50, 90]))
    return {"mean": mean, "std": float(v.std()), "p10": p10, "p50": p50, "p90": p90}


class MetaStrategy(Strategy):
    def __init__(self, setup: ExperimentSetup) -> None:
        self.setup = setup
        self.cfg = setup.config
        fed = self.cfg.federated
        self.optimizer = ServerOptimizer(fed.server_optimizer, fed.server_lr, fed.server_momentum,
                                         (fed.adam_beta1, fed.adam_beta2), fed.adam_eps)
        self.w: Params = dict(setup.initial_params)
        self.nodes: dict[int, int] = {}  # client id -> node id
        self.trained: set[int] = set()
        self.round_stats: dict[str, Any] = {}
        self.selector = PatternSelector(setup)  # Lambda-pattern selection; inert when mode is none

    # -- sampling -------------------------------------------------------------------------------
    def clients_for_round(self, server_round: int) -> list[int]:
        fed, n = self.cfg.federated, self.setup.federation.num_clients
        if fed.mode == "cross_silo":
            return list(range(n))
        k = fed.clients_per_round or max(1, round(fed.fraction * n))
        return sample_clients(self.cfg.seed, server_round, n, min(k, n))

    def eval_clients(self, server_round: int) -> list[int]:
        fed, seen = self.cfg.federated, sorted(self.trained)
        if fed.eval_clients and len(seen) > fed.eval_clients:
            rng = np.random.default_rng([self.cfg.seed, server_round, 0xE7])
            seen = sorted(int(c) for c in rng.choice(seen, size=fed.eval_clients, replace=False))
        if not seen:  # before any training: evaluate the first clients, so "before" has a value
            seen = list(range(min(fed.eval_clients or self.setup.federation.num_clients,
                                  self.setup.federation.num_clients)))
        n = self.setup.federation.num_clients
        return seen + [n + j for j in range(self.setup.federation.num_unseen)]

    def is_eval_round(self, server_round: int) -> bool:
        every = self.cfg.federated.eval_every
        return server_round in (0, self.cfg.federated.rounds) or (every > 0 and server_round % every == 0)

    def _messages(self, cids: list[int], content: RecordDict, kind: str, server_round: int
                  ) -> list[Message]:
        return [Message(content, self.nodes[c], kind, group_id=str(server_round)) for c in cids]

    # -- Strategy API ---------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        cids = self.clients_for_round(server_round)
        self.round_stats = {"clients": cids}
        cfg = ConfigRecord({**dict(config), **self.selector.train_config(), R.ROUND: server_round,
                            R.ETA: self.setup.eta_for_round(server_round)})
        return self._messages(cids, RecordDict({R.ARRAYS: arrays, R.CONFIG: cfg}), "train",
                              server_round)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        deltas, counts, metrics, errors = [], [], [], []
        for msg in replies:
            if msg.has_error():
                errors.append(f"client error: {msg.error.reason}")
                continue
            try:
                m = msg.content[R.METRICS]
                cid = int(m[R.PARTITION])
                deltas.append(R.from_record(msg.content[R.ARRAYS], self.w, f"update from client {cid}"))
                counts.append(int(m[R.NUM_EXAMPLES]))
                metrics.append(m)
                self.trained.add(cid)
            except (KeyError, TypeError, ValueError, MessageError) as e:
                errors.append(f"malformed reply: {e}")
        timeouts = len(self.round_stats.get("clients", [])) - len(replies)
        for e in errors:
            log.warning("round %d: %s", server_round, e)
        if timeouts > 0:
            log.warning("round %d: %d client(s) did not reply in time", server_round, timeouts)
        self.round_stats.update(failures=len(errors) + max(timeouts, 0), replies=len(deltas))
        if len(deltas) < self.cfg.federated.min_replies:
            log.warning("round %d: %d valid replies < min_replies=%d; the model is not updated",
                        server_round, len(deltas), self.cfg.federated.min_replies)
            return None, None
        self.w = self.optimizer.step(self.w, aggregate(deltas, counts, self.cfg.federated.aggregation))
        out = {k: float(np.mean([float(m[k]) for m in metrics])) for k in TRAIN_METRICS
               if all(k in m for m in metrics)}
        out["samples"] = sum(int(m["samples"]) for m in metrics)
        out["train-seconds-max"] = max(float(m["train-seconds"]) for m in metrics)
        return R.to_record(self.w), MetricRecord(out)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if not self.is_eval_round(server_round):
            return []
        content = RecordDict({R.ARRAYS: arrays,
                              R.CONFIG: ConfigRecord({**dict(config), **self.selector.evaluate_config(),
                                                      R.ROUND: server_round})})
        return self._messages(self.eval_clients(server_round), content, "evaluate", server_round)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        groups: dict[str, list[MetricRecord]] = {"seen": [], "unseen": []}
        failures = 0
        for msg in replies:
            if msg.has_error():
                failures += 1
                log.warning("round %d: evaluation error: %s", server_round, msg.error.reason)
                continue
            m = msg.content[R.METRICS]
            groups["unseen" if int(m["unseen"]) else "seen"].append(m)
        out: dict[str, Any] = {"eval-failures": failures}
        for group, ms in groups.items():
            if not ms:
                continue
            weights = [float(m[R.NUM_EXAMPLES]) for m in ms]
            for key in ("loss", "accuracy", "memory-loss", "memory-accuracy", "adapt-ms"):
                if all(key in m for m in ms):
                    values = [float(m[key]) for m in ms]
                    for stat, v in summarize(values, weights).items():
                        out[f"{group}.{key}.{stat}"] = v
                    out[f"{group}.{key}.clients"] = values
        return MetricRecord(out)

    def summary(self) -> None:
        fed = self.cfg.federated
        log.info("MetaStrategy: %s, %s, %s aggregation, server %s lr=%g", self.cfg.algorithm.name,
                 fed.mode, fed.aggregation, fed.server_optimizer, fed.server_lr)

    # -- the run loop ---------------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              *, on_round: Callable[[dict[str, Any]], None] | None = None) -> Result:
        """Flower's train -> aggregate -> evaluate loop, plus partition discovery, an evaluation
        before training, and a per-round record (``on_round``) with bytes, samples and time."""
        self.summary()
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        self.nodes = discover_partitions(grid, self.setup.federation.num_clients
                                         + self.setup.federation.num_unseen, timeout)
        self.w = R.from_record(initial_arrays, self.setup.initial_params, "initial arrays")
        arrays, result, start = initial_arrays, Result(), time.perf_counter()
        totals = {"samples": 0, "bytes_up": 0, "bytes_down": 0}
        for server_round in range(0, num_rounds + 1):
            row: dict[str, Any] = {"round": server_round}
            if server_round > 0:
                messages = list(self.configure_train(server_round, arrays, train_config, grid))
                down = sum(R.message_bytes(m) for m in messages)
                replies = list(grid.send_and_receive(messages, timeout=timeout))
                up = sum(R.message_bytes(m) for m in replies)
                new_arrays, train_metrics = self.aggregate_train(server_round, replies)
                if new_arrays is not None:
                    arrays = result.arrays = new_arrays
                if train_metrics is not None:
                    result.train_metrics_clientapp[server_round] = train_metrics
                totals["samples"] += int(train_metrics["samples"]) if train_metrics else 0
                totals["bytes_up"] += up
                totals["bytes_down"] += down
                row.update(clients=self.round_stats["clients"], failures=self.round_stats["failures"],
                           **({k.replace("-", "_"): v for k, v in train_metrics.items()}
                              if train_metrics else {}))
            if self.selector.due(server_round):  # after this round's update, before its evaluation
                row["pattern_selection"] = self.selector.run(
                    self.w, server_round,
                    lambda ms: list(grid.send_and_receive(ms, timeout=timeout)), self.nodes)
            eval_messages = list(self.configure_evaluate(server_round, arrays, evaluate_config, grid))
            if eval_messages:
                eval_metrics = self.aggregate_evaluate(
                    server_round, grid.send_and_receive(eval_messages, timeout=timeout))
                if eval_metrics is not None:
                    result.evaluate_metrics_clientapp[server_round] = eval_metrics
                    row["eval"] = dict(eval_metrics)
            row.update(totals, seconds=time.perf_counter() - start)
            if on_round:
                on_round(row)
        result.arrays = arrays
        return result


def discover_partitions(grid: Grid, expected: int, timeout: float) -> dict[int, int]:
    """Map client ids to node ids. Our own engines know it; otherwise ask every node once."""
    known = getattr(grid, "partition_nodes", None)
    if callable(known):
        return known()
    deadline = time.time() + max(timeout, 60)
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < expected and time.time() < deadline:
        time.sleep(0.5)  # simulation registers nodes while the ServerApp starts; devices connect late
        node_ids = list(grid.get_node_ids())
    replies = grid.send_and_receive(
        [Message(RecordDict(), nid, "query", group_id="discovery") for nid in node_ids],
        timeout=timeout)
    mapping: dict[int, int] = {}
    for msg in replies:
        if not msg.has_error():
            mapping[int(msg.content[R.METRICS][R.PARTITION])] = msg.metadata.src_node_id
    missing = sorted(set(range(expected)) - set(mapping))
    if missing:
        raise MessageError(f"no node serves client ids {missing[:10]}{'...' if len(missing) > 10 else ''}"
                           f" ({len(mapping)} of {expected} found); start one SuperNode per client id "
                           "with --node-config 'partition-id=<id>'")
    return mapping
