"""``MetaStrategy``: the server side of fedmaml as a Flower ``Strategy``
(docs/algorithms.md#federated-localmoml).

* **Sampling** by stable client id (partition id) with a seeded RNG, never by transport node ids:
  cross-device samples a fraction or count of clients per round (without replacement, O(k) work
  whatever the number of clients); cross-silo takes every silo every round.
* **Aggregation**: the replies are decoded here, then the server round
  (:func:`~fedmaml.federated.server_round.aggregate_round` with one run, the one a vectorized batch
  takes with many): example-weighted or uniform mean of the clients' updates (private, or the
  algorithm's own rule, when configured), then a server optimizer (SGD, momentum, Adam).
* **Failures**: error replies, malformed replies and missing replies (timeouts) are counted by kind
  and logged, updates holding NaN/inf are counted as rejected (``health.round_outcome``); the update
  is applied when at least ``min_replies`` valid replies arrived and the new ``w`` is finite (else
  the row says ``diverged`` and ``health.RunHealth`` stops the run).
* **Evaluation** every ``eval_every`` rounds (and before the first and after the last round): a
  fixed panel of training clients (``eval_clients`` of them, drawn once from the seed) and every
  unseen client. The panel is the same at every evaluation so that "before" and "after" compare the
  same clients (a per-round sample would add client-to-client variance to the curve). Per-client
  metrics are summarised as mean, std and p10/p50/p90 (docs/algorithms.md#evaluation); memory-based
  metrics cover the panel clients that have a memory (have trained). A grid that takes cohorts (the
  vectorized engine) gets one evaluate message for the whole panel and answers once (records.py).
* **Participation** (:mod:`~fedmaml.federated.participation`): the cohort is drawn among the
  clients available that round under ``participation.model``; the rounds since each sampled
  client's previous participation are counted as it is sampled.

One ``metrics.jsonl`` row per round (``on_round``): a
:class:`~fedmaml.results.metrics_row.MetricsRow`, whose module documents its keys.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.superlink.grid import InMemoryGrid

from fedmaml import collector
from fedmaml.algorithms import has_server_rule
from fedmaml.core.params import Params, num_bytes
from fedmaml.core.server import ServerOptimizer, mean_weights
from fedmaml.errors import MessageError
from fedmaml.federated import checkpoint, faults
from fedmaml.federated import records as R
from fedmaml.federated.discovery import PartitionDirectory
from fedmaml.federated.health import FAILURE_KINDS
from fedmaml.federated.participation import Participation, Staleness, client_sampling
from fedmaml.federated.pattern_selection import PatternSelector, selection_summary
from fedmaml.federated.privacy import UpdatePrivacy
from fedmaml.federated.reply_pull import puller_for
from fedmaml.federated.server_round import (PartSum, RoundRecord, aggregate_parts, aggregate_round,
                                            needs_every_update, part_sum)
from fedmaml.federated.server_state import ServerState
from fedmaml.federated.setup import ExperimentSetup
from fedmaml.results.metrics_row import MetricsRow, round_fields
from fedmaml.results.progress import status

log = logging.getLogger("fedmaml")

TRAIN_METRICS = ("loss-before", "loss-after")
EVAL_METRICS = ("loss", "accuracy", "memory-loss", "memory-accuracy", "memory-gap",
                "tracking-error", "staleness", "adapt-ms")
# Devices register while the ServerApp starts (and connect late): in a deployment wait at least this
# long for them, even when rounds have no time limit (round_timeout 0 -> timeout None). A
# simulation waits engine.discovery_timeout for the nodes its engine started.
DISCOVERY_SECONDS = 60.0


def summarize(values: list[float], weights: list[float]) -> dict[str, float]:
    v, w = np.asarray(values, dtype=float), np.asarray(weights, dtype=float)
    mean = float(np.average(v, weights=w)) if w.sum() > 0 else float(v.mean())
    p10, p50, p90 = (float(x) for x in np.percentile(v, [10, 50, 90]))
    return {"mean": mean, "std": float(v.std()), "p10": p10, "p50": p50, "p90": p90}


@dataclass
class TrainOutcome:
    """What one client's train round came to, whichever message carried it: a row of a stack of
    updates with its example count and metrics, or a failure ``(kind, message)`` with kind
    ``error``, ``timeout`` or ``malformed``. ``cid`` is ``None`` when the reply did not say."""

    cid: int | None
    row: tuple[int, int] | None = None  # (stack, row) of the update
    count: int = 0
    metrics: Mapping[str, Any] | None = None
    failure: tuple[str, str] | None = None
    part: tuple[int, int] | None = None  # (sums, part) holding the update, when summed by part


def _rows(stacks: list[Params], rows: list[tuple[int, int]]) -> Params:
    """The update rows ``(stack, row)`` of several stacks, as one stack (no copy when they are one
    whole stack in order)."""
    if len({s for s, _ in rows}) == 1:
        s = rows[0][0]
        index = [j for _, j in rows]
        n = len(next(iter(stacks[s].values()))) if stacks[s] else 0
        if index == list(range(n)):
            return stacks[s]
        at = torch.tensor(index)
        return {k: v[at] for k, v in stacks[s].items()}
    return {k: torch.stack([stacks[s][k][j] for s, j in rows]) for k in stacks[rows[0][0]]}


def _update_failure(error: str) -> tuple[str, str]:
    """An update that could not be used: ``rejected`` when it is well-formed but not finite
    (training diverged; health.py counts these apart), ``malformed`` otherwise."""
    kind = "rejected" if isinstance(error, R.NonFinite) else "malformed"
    return kind, f"{kind} update: {error}"


def _failed(cid: int, kind: str, reason: str, evaluation: bool) -> str:
    """How the log names a client that a cohort reply lists as failed: as a per-client train
    (``evaluation`` false) or evaluate reply's failure of that kind is named."""
    side = "evaluation " if evaluation else ""
    label = {"error": f"{side or 'client '}error", "malformed": f"malformed {side}reply"}
    return f"{label.get(kind, side + kind)}: client {cid}: {reason}"


def _checked_count(m: Mapping[str, Any], cid: int) -> int:
    """Client ``cid``'s example count from its train metrics ``m``, after checking every number the
    server reads from them (the last ones only when sent), so that a list or text fails this client
    alone (counted as malformed) rather than the round's averaging; a per-client reply's and a
    cohort reply's row alike."""
    count = int(m[R.NUM_EXAMPLES])
    if count <= 0:
        raise ValueError(f"client {cid} reported {count} examples")
    for key in ("samples", "train-seconds"):
        float(m[key])
    for key in (*TRAIN_METRICS, R.MEMORY_RESET):
        if key in m:
            float(m[key])
    return count


#: Longest wait between two polls for replies (see exchange).
MAX_POLL_SECONDS = 1.0


def exchange(grid: Grid, messages: Iterable[Message], timeout: float | None,
             poll_interval: float) -> list[Message]:
    """Send ``messages`` and wait for their replies (up to ``timeout`` seconds; ``None`` = no limit).

    ``Grid.send_and_receive`` with our poll interval: Flower's own loop sleeps 0.1 s between polls in
    simulation and 3 s against a SuperLink, so every round would wait that long after its last
    reply. We poll every ``poll_interval`` seconds, or every tenth of the time waited so far if that
    is longer (at most 1 s): a reply is noticed at most 10 % late, and a long deployed round does not
    cost the SuperLink a pull request every few milliseconds. Grids that deliver synchronously
    (``synchronous = True``: the in-process and vectorized engines) answer in one call. Replies
    that injected faults make late (``faults.arrived``) count as not arrived.

    Against a SuperLink, replies are pulled with :class:`~fedmaml.federated.reply_pull.ReplyPuller`,
    which never waits for a reply still being uploaded: Flower's ``pull_messages`` blocks on one
    (until its upload session expires, 180 s) when its device died mid-upload, and the round lost
    the replies of the others. Replies complete by the deadline count; the rest do not.
    """
    if getattr(grid, "synchronous", False):
        return faults.arrived(grid.send_and_receive(messages, timeout=timeout))
    puller = puller_for(grid)
    pull = grid.pull_messages if puller is None else puller.pull
    pending = {mid for mid in grid.push_messages(messages) if mid}
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    replies: list[Message] = []
    while pending:
        got = list(pull(list(pending)))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        now = time.monotonic()
        if not pending or (deadline is not None and now >= deadline):
            break
        time.sleep(min(MAX_POLL_SECONDS, max(poll_interval, (now - start) / 10)))
    if puller is not None and puller.incomplete():
        log.warning("%d repl%s still uploading at the round's deadline: not used (a device that "
                    "stopped while sending)", len(puller.incomplete()),
                    "y was" if len(puller.incomplete()) == 1 else "ies were")
    return faults.arrived(replies)


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
        self._timeout: float | None = None  # of the running start()
        self.selector = PatternSelector(setup)  # Lambda-pattern selection; inert when mode is none
        self._panel: list[int] | None = None
        self.w_before_update: Params = self.w  # the model before the last applied update
        self.touched: set[int] = set()  # clients sent a train instruction (they may hold a memory)
        self.totals = {"samples": 0, "bytes_up": 0, "bytes_down": 0}
        self.last_error = ""  # the last reason a reply was not used (for the run's status line)
        n = setup.federation.num_clients
        self.participation = Participation(self.cfg.participation, self.cfg.seed, n)
        self.staleness = Staleness(n)
        self.available: int | None = None  # clients available in the last sampled round
        self.sampling = client_sampling(fed, n)  # the scheme: denominator and privacy account
        self.privacy = UpdatePrivacy(self.cfg, self.sampling)  # the mean update, private or not

    # -- sampling -------------------------------------------------------------------------------
    def cohort_size(self) -> int:
        """Clients asked per round: every silo, or the configured count or fraction (under
        Poisson sampling, its expected count rounded)."""
        return self.sampling.size

    def clients_for_round(self, server_round: int) -> list[int]:
        cids = self.cohort_of(server_round)
        self.staleness.record(server_round, cids)
        return cids

    def cohort_of(self, server_round: int) -> list[int]:
        """The round's sampled clients (and ``available``), without the staleness bookkeeping (a
        batch of runs keeps that for all its runs at once)."""
        s = self.sampling
        if s.scheme == "all":
            return list(range(self.setup.federation.num_clients))
        cids = self.participation.cohort(
            server_round, s.size, s.rate if s.scheme == "poisson" else None)
        self.available = self.participation.last_available
        return cids

    def memory_metrics(self, server_round: int) -> dict[str, float]:
        """Evaluation-round diagnostics of participation and memory (docs/participation.md):
        ``sampled.staleness.{mean,p50,p90,max}`` (rounds since a sampled client's previous
        participation, over the participations since the previous evaluation; first participations
        excluded), ``sampled.first.fraction``, ``sampled.participations.count``, and the memory
        footprint ``memory.bytes.client`` / ``memory.bytes.total`` / ``memory.clients.count``
        (clients holding a memory: those sampled at least once)."""
        window = self.staleness.take_window()
        out = {f"sampled.staleness.{stat}": window[stat] for stat in ("mean", "p50", "p90", "max")
               if stat in window}
        if window:
            out["sampled.first.fraction"] = window["first"]
            out["sampled.participations.count"] = window["participations"]
        per_client, total = self.memory_bytes()
        holders = self.staleness.clients_seen if per_client else 0
        out.update({"memory.bytes.client": float(per_client), "memory.bytes.total": float(total),
                    "memory.clients.count": float(holders)})
        return out

    def memory_bytes(self) -> tuple[int, int]:
        """Bytes of one client's memories (one model per task; 0 without memory), and of the
        memories of every client that holds one (those sampled at least once)."""
        if not self.setup.algorithm.uses_memory:
            return 0, 0
        per_client = num_bytes(self.setup.initial_params) * self.cfg.data.tasks_per_client
        return per_client, per_client * self.staleness.clients_seen

    def participation_summary(self) -> dict[str, float]:
        """The run's staleness over every participation, and its final memory footprint."""
        stats = self.staleness.run_stats()
        per_client, total = self.memory_bytes()
        return {**stats, "clients_participated": float(self.staleness.clients_seen),
                "memory_bytes_per_client": float(per_client), "memory_bytes_total": float(total)}

    def eval_panel(self) -> list[int]:
        """The training clients evaluated at every evaluation round (a function of the seed)."""
        if self._panel is None:
            n, k = self.setup.federation.num_clients, self.cfg.federated.eval_clients
            if not k or k >= n:
                self._panel = list(range(n))
            else:
                rng = np.random.default_rng([self.cfg.seed, 0xE7])
                self._panel = sorted(int(c) for c in rng.choice(n, size=k, replace=False))
        return self._panel

    def eval_clients(self) -> list[int]:
        """Who every evaluation measures: the fixed panel, then every unseen client."""
        n = self.setup.federation.num_clients
        return self.eval_panel() + [n + j for j in range(self.setup.federation.num_unseen)]

    def is_eval_round(self, server_round: int) -> bool:
        every = self.cfg.federated.eval_every
        return server_round in (0, self.cfg.federated.rounds) or (every > 0 and server_round % every == 0)

    def _instructions(self, cids: list[int], arrays: ArrayRecord, config: dict[str, Any],
                      kind: str, server_round: int, grid: Grid | None) -> list[Message]:
        """The round's ``kind`` instructions to the clients of ``cids`` that a node serves: to a
        grid that takes cohorts one message for all of them, remembered with its clients so that
        its reply can be traced to them; else one message per client."""
        known = [c for c in cids if c in self.nodes]
        if len(known) < len(cids):  # counted as failed (no reply) by the aggregation
            log.warning("round %d: no node serves client(s) %s; skipped", server_round,
                        [c for c in cids if c not in self.nodes])
        cohort = getattr(grid, "takes_cohorts", False)
        if cohort:
            config = {**config, R.COHORT: known}
        content = RecordDict({R.ARRAYS: arrays, R.CONFIG: ConfigRecord(config)})
        # A message outlives its round only to mislead: a node that comes back after the round
        # timeout would train on a stale w (and move its memory) for a reply nobody waits for.
        ttl = self._timeout if self._timeout else None
        messages = [Message(content, self.nodes[c], kind, ttl=ttl, group_id=str(server_round))
                    for c in (known[:1] if cohort else known)]  # a cohort's to its first's node
        if cohort and messages:  # its id is set when it is sent
            self.round_stats.setdefault("cohorts", []).append((messages[0], known))
        return messages

    # -- Strategy API ---------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        cids = self.clients_for_round(server_round)
        self.touched.update(cids)
        self.round_stats = {"clients": cids}
        cfg = {**dict(config), **self.selector.train_config(), R.ROUND: server_round,
               R.ETA: self.setup.eta_for_round(server_round)}
        return self._instructions(cids, arrays, cfg, "train", server_round, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Apply the mean update when ``min_replies`` valid replies arrived. The metrics (losses,
        samples) are returned whenever any reply is valid: the clients did the work either way.

        Per-client replies and cohort replies (one for many clients, updates stacked) both become
        the same per-client :class:`TrainOutcome` s, accounted and averaged by one function."""
        stacks: list[Params] = []
        sums: list[Params] = []  # per reply summed by part (the sharded engine's), its part sums
        outcomes: list[TrainOutcome] = []
        per_client: list[Message] = []
        for msg in replies:
            if msg.has_content() and R.FAILURES in msg.content:
                outcomes += self._cohort_outcomes(msg, stacks, sums)
            elif msg.has_error() and self._cohort_of(msg) is not None:
                outcomes += [TrainOutcome(cid, failure=("error", f"client error: {msg.error.reason}"))
                             for cid in self._cohort_of(msg)]
            else:
                per_client.append(msg)
        if per_client:
            outcomes += self._client_outcomes(per_client, stacks)
        return self._account_train(server_round, stacks, outcomes, sums)

    def _client_outcomes(self, replies: list[Message], stacks: list[Params]) -> list[TrainOutcome]:
        """Per-client replies: their metrics checked here, their arrays decoded and checked
        together (``R.stack_from_records``), before any of it is used (a reply is used whole or not
        at all)."""
        outcomes, parsed = [], []
        for msg in replies:
            if msg.has_error():
                outcomes.append(TrainOutcome(None, failure=("error",
                                                            f"client error: {msg.error.reason}")))
                continue
            try:
                m = msg.content[R.METRICS]
                cid, record = int(m[R.PARTITION]), msg.content[R.ARRAYS]
                if not isinstance(record, ArrayRecord):
                    raise TypeError(f"client {cid}'s {R.ARRAYS!r} is a {type(record).__name__}, "
                                    "not an ArrayRecord")
                parsed.append((cid, record, _checked_count(m, cid), m))
            except (KeyError, TypeError, ValueError, MessageError) as e:
                outcomes.append(TrainOutcome(None, failure=("malformed", f"malformed reply: {e}")))
        stacked, array_errors = R.stack_from_records(
            [p[1] for p in parsed], self.w, [f"update from client {p[0]}" for p in parsed])
        at = len(stacks)
        stacks.append(stacked)
        for j, ((cid, _, count, m), error) in enumerate(zip(parsed, array_errors)):
            outcomes.append(TrainOutcome(cid, (at, j), count, m) if error is None else
                            TrainOutcome(cid, failure=_update_failure(error)))
        return outcomes

    def _cohort_outcomes(self, msg: Message, stacks: list[Params], sums: list[Params]
                         ) -> list[TrainOutcome]:
        """A cohort reply: every client it names becomes an outcome; a reply that cannot be read
        fails every client of its cohort as malformed. Its updates are a stack of rows (appended
        to ``stacks``) or, summed by part, the part sums (appended to ``sums``)."""
        content = msg.content
        try:
            rows = R.metric_rows(content[R.METRICS])
            ids = [int(m[R.PARTITION]) for m in rows]
            failures = R.failures_from(content[R.FAILURES])
            if R.PARTS in content:
                summed, part_of, row_errors = self._part_sums(content, len(ids))
            else:
                stacked, row_errors = R.stack_from_cohort(
                    content[R.ARRAYS], self.w, [f"update from client {c}" for c in ids])
                part_of = None
        except (KeyError, TypeError, ValueError, MessageError) as e:
            cids = self._cohort_of(msg) or [None]
            return [TrainOutcome(cid, failure=("malformed", f"malformed reply: {e}"))
                    for cid in cids]
        if part_of is None:
            at = len(stacks)
            stacks.append(stacked)
        else:
            at = len(sums)
            sums.append(summed)
        outcomes = []
        for j, (cid, error) in enumerate(zip(ids, row_errors)):
            try:  # checked as a per-client reply's numbers are: a row that fails, fails alone
                count, malformed = _checked_count(rows[j], cid), None
            except (KeyError, TypeError, ValueError) as e:
                count, malformed = 0, f"malformed reply: {e}"
            if error is not None:
                outcomes.append(TrainOutcome(cid, failure=_update_failure(error)))
            elif malformed is not None:
                # its update, if summed into a part, spoils that part (_account_train)
                part = None if part_of is None or part_of[j] < 0 else (at, part_of[j])
                outcomes.append(TrainOutcome(cid, failure=("malformed", malformed), part=part))
            elif part_of is None:
                outcomes.append(TrainOutcome(cid, (at, j), count, rows[j]))
            elif part_of[j] < 0:
                outcomes.append(TrainOutcome(cid, failure=(
                    "malformed", f"malformed reply: no part holds client {cid}'s update")))
            else:
                outcomes.append(TrainOutcome(cid, None, count, rows[j], part=(at, part_of[j])))
        for cid, kind, reason in failures:
            outcomes.append(TrainOutcome(cid, failure=(
                kind if kind in FAILURE_KINDS else "error",  # a kind we do not know: it failed
                _failed(cid, kind, reason, evaluation=False))))
        return outcomes

    def _part_sums(self, content: RecordDict, n: int
                   ) -> tuple[Params, list[int], list[str | None]]:
        """A reply summed by part (records.py): its part sums ``[P, ...]``, per metrics row its
        part (-1: none) and why its update was rejected (``None``: it was not)."""
        parts = content[R.PARTS]
        weighting = str(parts[R.WEIGHTING])
        if weighting != self.cfg.federated.aggregation:
            raise ValueError(f"the reply's parts are {weighting} sums, the run's "
                             f"federated.aggregation is {self.cfg.federated.aggregation}")
        part_of = [int(p) for p in parts[R.PART]]
        rejected = [R.NonFinite(r) if r else None for r in (str(r) for r in parts[R.REJECTED])]
        if len(part_of) != n or len(rejected) != n:
            raise ValueError("the parts' lists differ in length from partition-id")
        summed = R.stacked_from(content[R.PART_SUMS], self.w, None, R.PART_SUMS)
        count = len(next(iter(summed.values()))) if summed else 0
        if any(p >= count for p in part_of):
            raise ValueError(f"a row names part {max(part_of)} of {count} part sums")
        return summed, part_of, rejected

    def _cohort_of(self, msg: Message) -> list[int] | None:
        """The client ids of the cohort instruction (train or evaluate) ``msg`` answers (``None``:
        not a cohort's)."""
        answered = msg.metadata.reply_to_message_id
        return next((cids for m, cids in self.round_stats.get("cohorts", [])
                     if m.metadata.message_id == answered), None)

    def _account_train(self, server_round: int, stacks: list[Params],
                       outcomes: list[TrainOutcome], sums: Sequence[Params] = ()
                       ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Count, log and average a round's per-client outcomes, whatever messages carried them."""
        expected = set(self.round_stats.get("clients", []))
        errors: list[tuple[str, str]] = []  # (kind, why): health.round_outcome counts the kinds
        used: dict[int, TrainOutcome] = {}  # valid outcomes by client, in arrival order
        for o in outcomes:
            failure = o.failure
            if failure is None and (o.cid not in expected or o.cid in used):
                failure = ("malformed",
                           f"unexpected reply from client {o.cid} (not sampled, or a duplicate)")
            if failure is None:
                used[o.cid] = o
            else:
                errors.append(failure)
        # A part sum holds every update its reply put in it: one the server cannot use (a client
        # not sampled, or named twice) spoils the whole part, whose clients then fail.
        spoiled = (Counter(o.part for o in outcomes if o.part is not None)
                   - Counter(o.part for o in used.values() if o.part is not None))
        for o in [o for o in used.values() if o.part in spoiled]:
            del used[o.cid]
            errors.append(("malformed", f"malformed reply: client {o.cid}'s update is summed "
                                        "with one the server cannot use"))
        missing = max(len(expected) - len(outcomes), 0)
        # A fault injected on purpose (faults.*) is expected: counted like any failure, logged
        # below the warnings that --quiet keeps. Real failures warn.
        faulty = faults.enabled(self.cfg)
        for kind, e in errors:
            (log.info if faulty and faults.is_injected(e) else log.warning)(
                "round %d: %s", server_round, e)
        if errors:
            self.last_error = errors[-1][1]
        late = 0  # missing replies of clients the fault model made stragglers or dropouts
        if missing > 0 and faulty:
            replied = {o.cid for o in outcomes}
            late = min(missing, sum(
                faults.client_fault(self.cfg, cid, server_round) in ("straggle", "dropout")
                for cid in expected if cid not in replied))
            if late:
                log.info("round %d: %d client(s) did not reply in time (injected: "
                         "faults.straggle, faults.dropout)", server_round, late)
        if missing > late:
            log.warning("round %d: %d client(s) did not reply in time", server_round,
                        missing - late)
        # In client-id order: replies arrive in any order (Ray, devices), and the average's last
        # bits must not depend on it (a resumed run equals an uninterrupted one).
        valid = sorted(used.values(), key=lambda o: o.cid)
        self.trained.update(used)
        self._count_resets(server_round, [o.cid for o in valid
                                          if float(o.metrics.get(R.MEMORY_RESET, 0)) > 0])
        if any(o.part is not None for o in valid):
            record = self._server_round(server_round, None, [o.count for o in valid],
                                        [k for k, _ in errors], missing,
                                        self._parts(stacks, sums, valid))
        else:
            stacked = (_rows(stacks, [o.row for o in valid]) if valid else
                       {k: torch.zeros(0, *v.shape, dtype=v.dtype) for k, v in self.w.items()})
            record = self._server_round(server_round, stacked, [o.count for o in valid],
                                        [k for k, _ in errors], missing)
        self.round_stats.update(record.row())
        if not record.updated and record.diverged is None:
            log.warning("round %d: %d valid replies < min_replies=%d; the model is not updated",
                        server_round, len(valid), self.cfg.federated.min_replies)
        arrays = R.kept_record(self.w) if record.updated else None
        if not valid:  # a private Poisson round that nobody answered: its release, no metrics
            return arrays, None
        metrics = [o.metrics for o in valid]
        out = {k: math.fsum(float(m[k]) for m in metrics) / len(metrics) for k in TRAIN_METRICS
               if all(k in m for m in metrics)}
        out["samples"] = sum(int(m["samples"]) for m in metrics)
        out["train-seconds-max"] = max(float(m["train-seconds"]) for m in metrics)
        return arrays, MetricRecord(out)

    def _parts(self, stacks: list[Params], sums: Sequence[Params], valid: list[TrainOutcome]
               ) -> list[PartSum]:
        """The valid updates of a round summed by part (in client-id order ``valid``): the parts of
        the replies that sent sums, in reply and part order, each weighted by its clients' counts,
        after a part of the rows other replies sent, summed here."""
        weighting = self.cfg.federated.aggregation
        rows = [o for o in valid if o.part is None]
        parts = ([part_sum(_rows(stacks, [o.row for o in rows]), [o.count for o in rows],
                           weighting)] if rows else [])
        members: dict[tuple[int, int], list[int]] = {}
        for o in valid:
            if o.part is not None:
                members.setdefault(o.part, []).append(o.count)
        for (s, p), counts in sorted(members.items()):
            weights = mean_weights(counts, weighting)
            parts.append(PartSum({k: v[p] for k, v in sums[s].items()}, sum(weights), len(counts)))
        return parts

    def _server_round(self, server_round: int, stacked: Params | None, counts: list[int],
                      failed: list[str], missing: int, parts: list[PartSum] | None = None
                      ) -> RoundRecord:
        """This run's server round (:func:`~fedmaml.federated.server_round.aggregate_round` with
        one run) on its valid updates ``stacked`` (in client-id order), or
        (:func:`~fedmaml.federated.server_round.aggregate_parts`) on their ``parts``; ``w`` moves
        when it applies. ``failed``: the kind of every reply not used; ``missing``: replies not
        arrived."""
        fed, algorithm, opt = self.cfg.federated, self.setup.algorithm, self.optimizer
        one = lambda p: {k: v.unsqueeze(0) for k, v in p.items()}  # noqa: E731 - a run axis
        opt.state = one(opt.state)  # the run alone keeps its state without the run axis
        try:
            if parts is not None:
                if needs_every_update(self.cfg, algorithm):
                    raise ValueError("updates summed by part reached a server round that needs "
                                     "each update (the algorithm's server rule, or privacy)")
                result = aggregate_parts(one(self.w), opt, parts,
                                         self.round_stats.get("clients", []),
                                         min_replies=fed.min_replies, failed=failed,
                                         missing=missing)
            else:
                result = aggregate_round(
                    one(self.w), opt, one(stacked), torch.ones(1, len(counts), dtype=torch.bool),
                    [self.round_stats.get("clients", [])], weighting=fed.aggregation,
                    min_replies=fed.min_replies,
                    counts=torch.tensor(counts, dtype=torch.float64).reshape(1, len(counts)),
                    failed=[failed], missing=[missing], privacy=[self.privacy],
                    round_number=server_round,
                    rule=algorithm.server_update if has_server_rule(algorithm) else None,
                    finite=True)  # the decoders rejected NaN/inf (R.stack_from_records, _cohort)
        finally:
            opt.state = {k: v[0] for k, v in opt.state.items()}
        if bool(result.moved[0]):
            self.w_before_update, self.w = self.w, {k: v[0] for k, v in result.w.items()}
        return result.records[0]

    def _count_resets(self, server_round: int, cids: list[int]) -> None:
        """Note the clients whose corrupt memory file was replaced by a fresh memory (a device with
        ``memory-reset=true``), found by a training or an evaluation of this round."""
        if not cids:
            return
        log.warning("round %d: client(s) %s started with a fresh memory (their memory file was "
                    "corrupt; memory-reset=true)", server_round, cids)
        before = self.round_stats.get("memory_reset_clients", [])
        self.round_stats.update(memory_resets=len(before) + len(cids),
                                memory_reset_clients=sorted([*before, *cids]))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if not self.is_eval_round(server_round):
            return []
        cfg = {**dict(config), **self.selector.evaluate_config(), R.ROUND: server_round}
        cids = self.eval_clients()
        self.round_stats["eval-clients"] = cids
        return self._instructions(cids, arrays, cfg, "evaluate", server_round, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord:
        """Per group (seen = the training panel, unseen): every metric's summary and per-client
        list, ordered as ``<group>.ids``. A client without a memory has NaN for memory metrics
        (null in metrics.jsonl); their summary covers the clients that have one. Error, malformed
        and missing replies are counted in ``eval-failures`` and never stop the run.

        Per-client replies and cohort replies (one for a whole panel, metrics as per-client lists)
        both become per-client outcomes, summarized by the same code."""
        outcomes = [o for msg in replies for o in self._evaluate_outcomes(msg)]
        return self.evaluation_metrics(server_round, self.round_stats.get("eval-clients", []),
                                       outcomes)

    def evaluation_metrics(self, server_round: int, cids: list[int],
                           outcomes: list[tuple[Mapping[str, Any] | None, str | None]]
                           ) -> MetricRecord:
        """The evaluation record of the panel ``cids`` from its per-client outcomes, ``(metrics,
        None)`` or ``(None, why it failed)`` (:meth:`aggregate_evaluate`)."""
        expected = set(cids)
        groups: dict[str, dict[int, Mapping[str, Any]]] = {"seen": {}, "unseen": {}}
        failures = max(len(expected) - len(outcomes), 0)  # no reply in time
        if failures:
            log.warning("round %d: %d evaluation(s) did not reply in time", server_round, failures)
        for m, failure in outcomes:
            if failure is not None:
                failures += 1
                log.warning("round %d: %s", server_round, failure)
                continue
            try:
                cid, unseen, weight = int(m[R.PARTITION]), int(m["unseen"]), float(m[R.NUM_EXAMPLES])
                if cid not in expected or weight <= 0:
                    raise ValueError(f"client {cid}: not asked, or {weight} examples")
            except (KeyError, TypeError, ValueError) as e:
                failures += 1
                log.warning("round %d: malformed evaluation reply: %s", server_round, e)
                continue
            age = self.staleness.age(cid, server_round) if not unseen else math.nan
            if not math.isnan(age):  # its memory's age, from the strategy's own bookkeeping
                m = {**dict(m), "staleness": age}
            groups["unseen" if unseen else "seen"][cid] = m
        self._count_resets(server_round, sorted(
            c for by_id in groups.values() for c, m in by_id.items()
            if float(m.get(R.MEMORY_RESET, 0)) > 0))
        out: dict[str, Any] = {"eval-failures": failures, **self.memory_metrics(server_round)}
        for group, by_id in groups.items():
            if not by_id:
                continue
            ids = sorted(by_id)
            ms = [by_id[c] for c in ids]
            out[f"{group}.ids"] = ids
            for key in EVAL_METRICS:
                values = [float(m[key]) if key in m else math.nan for m in ms]
                have = [i for i, v in enumerate(values) if key in ms[i]]
                if not have:
                    continue
                stats = summarize([values[i] for i in have],
                                  [float(ms[i][R.NUM_EXAMPLES]) for i in have])
                for stat, v in stats.items():
                    out[f"{group}.{key}.{stat}"] = v
                out[f"{group}.{key}.clients"] = values
        return MetricRecord(out)

    def _evaluate_outcomes(self, msg: Message) -> list[tuple[Mapping[str, Any] | None, str | None]]:
        """An evaluate reply as per-client ``(metrics, None)`` or ``(None, why it failed)``: one for
        a per-client reply, one per client for a cohort reply; an error reply to a cohort, or a
        cohort reply that cannot be read, fails every client of its cohort."""
        cohort = self._cohort_of(msg)
        if msg.has_error():
            return [(None, f"evaluation error: {msg.error.reason}")] * len(cohort or [None])
        content = msg.content
        try:
            if R.FAILURES not in content:
                return [(content[R.METRICS], None)]
            rows = R.metric_rows(content[R.METRICS], content.get(R.ABSENT))
            failed = R.failures_from(content[R.FAILURES])
        except (KeyError, TypeError, ValueError) as e:
            return [(None, f"malformed evaluation reply: {e}")] * len(cohort or [None])
        return [*((m, None) for m in rows),
                *((None, _failed(cid, kind, reason, evaluation=True))
                  for cid, kind, reason in failed)]

    # -- checkpoints (fedmaml/federated/checkpoint.py) ------------------------------------------
    def export_state(self) -> ServerState:
        """The server's state after a round: what the rest of the run depends on."""
        sel = self.selector
        return ServerState(
            w=dict(self.w), w_before_update=dict(self.w_before_update),
            optimizer_state=dict(self.optimizer.state), optimizer_steps=self.optimizer.steps,
            trained=sorted(self.trained), touched=sorted(self.touched),
            # the record as its JSON (what it is written as): it holds e.g. torch versions
            selector={"record": json.dumps(sel.record, default=str),
                      "train": dict(sel._train), "evaluate": dict(sel._evaluate)},
            totals=dict(self.totals), staleness=self.staleness.state(),
            privacy=self.privacy.state())

    def import_state(self, state: ServerState) -> None:
        """Continue from ``state`` (a checkpoint's, or a batch's run handed to it)."""
        self.w, self.w_before_update = dict(state.w), dict(state.w_before_update)
        self.optimizer.state = dict(state.optimizer_state)
        self.optimizer.steps = int(state.optimizer_steps)
        self.trained, self.touched = set(state.trained), set(state.touched)
        sel = self.selector
        sel.record = json.loads(state.selector["record"])
        sel._train, sel._evaluate = dict(state.selector["train"]), dict(state.selector["evaluate"])
        self.totals = dict(state.totals)
        self.staleness.load_state(state.staleness)
        self.privacy.load_state(state.privacy)

    def summary_parts(self) -> dict[str, Any]:
        """What summary.json reports of the server's side: participation and memory footprint,
        and the privacy account and pattern selection when the run has them."""
        parts: dict[str, Any] = {"participation": self.participation_summary()}
        if (privacy := self.privacy.summary()) is not None:
            parts["privacy"] = privacy
        if self.selector.record is not None:
            parts["pattern_selection"] = selection_summary(self.selector.record)
        return parts

    def checkpoint_memories(self, grid: Grid) -> dict[str, Any]:
        """Every client's memory (``checkpoint.collect_memories``), asked through ``grid``."""
        return checkpoint.collect_memories(grid, self.nodes, sorted(self.touched),
                                           self._sender(grid), simulated(grid))

    def _sender(self, grid: Grid) -> Callable[[list[Message]], list[Message]]:
        """Send messages through ``grid`` and wait for their replies (:func:`exchange`), with the
        running start()'s timeout."""
        return lambda ms: exchange(grid, ms, self._timeout, self.cfg.federated.poll_interval)

    def summary(self) -> None:  # Flower's Strategy requires it
        fed = self.cfg.federated
        log.info("MetaStrategy: %s, %s, %s aggregation, server %s lr=%g", self.cfg.algorithm.name,
                 fed.mode, fed.aggregation, fed.server_optimizer, fed.server_lr)

    # -- the run loop ---------------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              *, on_round: Callable[[MetricsRow], None] | None = None,
              resume: tuple[int, float, ServerState, dict[str, Any]] | None = None) -> Result:
        """Flower's train -> aggregate -> evaluate loop, plus partition discovery, an evaluation
        before training, and a per-round record (``on_round``) with bytes, samples and time.
        ``resume``: ``(round, seconds, server state, memories)`` of a checkpoint
        (fedmaml/federated/run_ledger.py) to continue from, after its round, with the server's
        state and every client's memory as they were then. There is no
        ``evaluate_fn`` (Flower's server-side evaluation): evaluation is personalized, on the
        clients' own data, so a server-side function would have nothing to measure."""
        self.summary()
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        self._timeout = timeout
        send = self._sender(grid)
        directory = PartitionDirectory(grid, self.setup.federation.num_clients
                                       + self.setup.federation.num_unseen)
        if isinstance(grid, InMemoryGrid):  # Flower's (Ray) simulation: it started every node
            self.nodes = directory.discover(self.cfg.engine.discovery_timeout, simulation=True)
        else:  # devices, which may connect late
            self.nodes = directory.discover(max(timeout or 0.0, DISCOVERY_SECONDS))
        self.w = R.from_record(initial_arrays, self.setup.initial_params, "initial arrays")
        self.w_before_update = self.w
        arrays, result, start = initial_arrays, Result(), time.perf_counter()
        self.totals = {"samples": 0, "bytes_up": 0, "bytes_down": 0}
        first = 0
        if resume is not None:
            done, seconds, state, memories = resume
            self.import_state(state)
            checkpoint.restore_memories(grid, self.nodes, memories, send)
            arrays, first = R.kept_record(self.w), done + 1
            start -= seconds
        for server_round in range(first, num_rounds + 1):
            row = MetricsRow(server_round)
            self.nodes = directory.refresh()  # nodes that joined or restarted since
            if server_round > 0:
                with collector.paused():  # the round's messages come and go at once (collector.py)
                    messages = list(self.configure_train(server_round, arrays, train_config, grid))
                    down = sum(R.instruction_bytes(m) for m in messages)
                    replies = send(messages)
                    up = sum(R.reply_bytes(m, self.w) for m in replies)
                    new_arrays, train_metrics = self.aggregate_train(server_round, replies)
                    del messages, replies
                if new_arrays is not None:
                    arrays = result.arrays = new_arrays
                row = MetricsRow(server_round, available=self.available,
                                 **round_fields(self.round_stats))
                if train_metrics is not None:
                    result.train_metrics_clientapp[server_round] = train_metrics
                    self.totals["samples"] += int(train_metrics["samples"])
                    row.set_train(train_metrics)
                self.totals["bytes_up"] += up
                self.totals["bytes_down"] += down
            if self.selector.due(server_round):  # after this round's update, before its evaluation
                row.pattern_selection = self.selector.run(self.w, server_round, send, self.nodes)
            eval_messages = list(self.configure_evaluate(server_round, arrays, evaluate_config, grid))
            if eval_messages:
                status(f"evaluating on {len(eval_messages)} clients")  # can outlast many rounds
                eval_metrics = self.aggregate_evaluate(server_round, send(eval_messages))
                result.evaluate_metrics_clientapp[server_round] = eval_metrics
                row.eval = dict(eval_metrics)
            # the memory resets of the round's training and evaluation, not carried into the next
            row.memory_resets = self.round_stats.pop("memory_resets", None)
            row.memory_reset_clients = self.round_stats.pop("memory_reset_clients", None)
            row.samples, row.bytes_up, row.bytes_down = (
                self.totals["samples"], self.totals["bytes_up"], self.totals["bytes_down"])
            row.seconds = time.perf_counter() - start
            if on_round:
                on_round(row)
        result.arrays = arrays
        return result


def simulated(grid: Grid) -> bool:
    """Whether ``grid`` is a simulation (Flower's Ray engine, or fedmaml's in-process and
    vectorized engines, which deliver synchronously) rather than real devices."""
    return isinstance(grid, InMemoryGrid) or bool(getattr(grid, "synchronous", False))
