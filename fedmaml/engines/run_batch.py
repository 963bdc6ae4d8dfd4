"""Many runs of equal shapes as one computation: the engine of ``fedmaml sweep --vectorize``.

A sweep's runs often differ only in numbers: seeds and continuous hyperparameters (``eta``,
``beta``, ``alpha``, ``hf_delta``, the server's learning rate). For the small models of
meta-learning research one run's round is a few milliseconds of tiny tensor operations, so running
them one after another is bound by Python and dispatch overhead. A :class:`RunBatch` stacks ``R``
such runs along a leading run axis and takes every round of all of them at once:

1. each run samples its cohort with its own strategy (:class:`MetaStrategy`: the seeded
   participation stream and the staleness bookkeeping of a run alone);
2. the ``R x C`` clients draw their round data in one call (the client library's
   ``draw_cohort_data``: counter-based streams keyed by each run's ``(seed, client, round)``, so a
   client's data equals its draw in the run alone); first participations draw their memory
   initialisation apart and initialise it first;
3. one call of the client library's :func:`~fedmaml.client.runs_update` (the cohort update
   vmapped over the runs) with each run's ``w``, memories and hyperparameters as tensors;
4. the server round of every run at once (:func:`~fedmaml.federated.server_round.aggregate_round`,
   the one a run alone takes): updates holding NaN/inf are rejected, the rest averaged (uniform or
   by examples; clipped and noised per run with its own stream when private; the algorithm's own
   server rule run by run) and stepped by the server optimizer with the run's own rate and state,
   a non-finite ``w`` kept out;
5. every run keeps its books in its own run ledger (fedmaml/federated/run_ledger.py), as a run
   alone does: the same metrics.jsonl rows (:class:`~fedmaml.results.metrics_row.MetricsRow`;
   ``seconds`` is the batch's clock), summary.json with its own status, model.pt, convergence.png,
   checkpoints and tracking. A run that diverges (or fails) ends there with its status and leaves
   the batch; the others go on.

Evaluation rounds evaluate each run's panel client by client with the client library's
``evaluate_client``, summarised by the strategy's own code, so the ``eval`` rows equal the run
alone's. Memories live in one dense tensor per parameter, ``[R, clients, tasks, ...]``; a checkpoint
writes each run's as a memory bank (the vectorized engine's format), so one run of a batch can also
be resumed alone (``fedmaml run --resume`` with ``engine.name: vectorized``).

The clients' side of a round is the client library's (fedmaml/client/), as in a run alone: injected
faults (a failed or dropped-out client does no work and keeps its memory; a straggler trains but
arrives late), compute-speed models and round deadlines (each client's share of the batch's time,
times its speed, against ``federated.round_timeout``) decide the valid clients of each run.
Availability models (``participation.model``) and Poisson sampling draw each run's cohort with its
own strategy (sizes vary: cohorts are padded, the padding does no work and counts nowhere: the
server round's valid mask). A run's ``compare_with`` baselines are runs of their own (their own
directories and ledgers, under ``<run>/baselines/``): a batch trains only the runs it is given, and
the sweep trains the baselines of a batch's runs as batches of their own after it
(fedmaml/sweep.py ``execute_batch``).

Lambda-pattern selection (docs/lambda_patterns.md) is each run's own (:meth:`RunBatch._select`);
afterwards runs train in groups of equal patterns within a round (:meth:`RunBatch._update`) and
evaluate grouped by pattern. What a batch cannot hold (:func:`batch_refusal`): a non-CPU device and
a user model vmap cannot batch. ``fedmaml sweep --vectorize`` runs such runs one by one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fedmaml import collector
from fedmaml.algorithms import Hyper, RoundData, has_server_rule
from fedmaml.algorithms.base import draw_init
from fedmaml.client import (CompiledUpdate, clip_client_updates, initial_memories,
                            memory_init_mask, runs_update, samples_drawn)
from fedmaml.client.faults import (FAIL, NONE, arrives, enabled as faults_enabled, fail,
                                   fault_codes, fault_rates, injected_counts, trains)
from fedmaml.client.metrics import example_counts
from fedmaml.client.speed import past_deadline, simulated_seconds
from fedmaml.client.train import draw_cohort_data
from fedmaml.config import Config
from fedmaml.core.params import Params, stack
from fedmaml.core.server import ServerOptimizer, per_run
from fedmaml.data.counter import round_keys
from fedmaml.data.tasks import Task
from fedmaml.engines.batch_evaluation import BatchEvaluator
from fedmaml.engines.batch_plan import PER_RUN_KEYS, batch_key, batch_refusal
from fedmaml.engines.inprocess import InProcessGrid, claim_task_identity
from fedmaml.federated import checkpoint
from fedmaml.federated import records as R
from fedmaml.federated.bank_state import bank_state
from fedmaml.federated.client_app import make_client_app
from fedmaml.federated.health import RunStopped
from fedmaml.federated.participation import sample_cohorts
from fedmaml.federated.pattern_selection import hyper_for
from fedmaml.federated.run_ledger import RunLedger
from fedmaml.federated.server_round import aggregate_round
from fedmaml.federated.server_state import ServerState
from fedmaml.federated.setup import (ExperimentSetup, setup_for, use_torch_threads,
                                     warn_pattern_steps)
from fedmaml.federated.strategy import TRAIN_METRICS, MetaStrategy, exchange
from fedmaml.results.metrics_row import MetricsRow
from fedmaml.results.progress import Progress
from fedmaml.tracking import one_attempt_per_store

log = logging.getLogger("fedmaml")

#: The hyperparameters a batch carries per run, as tensors ``[R]``.
_VALUES = ("eta", "alpha", "beta", "hf_delta")
#: Pending rows are written at least this often (rounds).
_FLUSH_ROUNDS = 200
#: Clients whose tasks a batch keeps at hand, per run.
_TASK_CACHE = 4096


def _row(params: Params, i: int) -> Params:
    return {k: v[i].clone() for k, v in params.items()}


class RunBatch:
    """``R`` runs of equal shapes (:func:`batch_key`) trained together, each into its run
    directory. ``resume``: continue every run from its checkpoint (all after the same round)."""

    def __init__(self, configs: Sequence[Config], run_dirs: Sequence[str | Path], *,
                 quiet: bool = True, resume: bool = False) -> None:
        if not configs or len(configs) != len(run_dirs):
            raise ValueError("a batch needs one run directory per config")
        keys = {batch_key(c) for c in configs}
        if len(keys) != 1:
            raise ValueError("the runs of a batch must share every setting but "
                             f"{', '.join(PER_RUN_KEYS)} and the tracking/evaluation/engine keys")
        for c in configs:
            if (why := batch_refusal(c)) is not None:
                raise ValueError(f"{c.name} cannot run in a batch: {why}")
        self.cfgs = list(configs)
        self.dirs = [Path(d) for d in run_dirs]
        use_torch_threads(self.cfgs[0].engine)  # as a ClientApp sets them
        self.setups: list[ExperimentSetup] = [setup_for(c) for c in self.cfgs]
        warn_pattern_steps(self.cfgs)
        first = self.setups[0]
        self.algorithm, self.model, self.loss_fn = first.algorithm, first.model, first.loss_fn
        algorithm, model, loss_fn = self.algorithm, self.model, self.loss_fn
        self._runs_update = CompiledUpdate(  # engine.compile, as the vectorized engine's cohorts
            lambda hp, w, memory, data, values: runs_update(algorithm, model, loss_fn, hp, w,
                                                             memory, data, values),
            self.cfgs[0].engine.compile, "vectorized batch")
        self.rounds = self.cfgs[0].federated.rounds
        self.strategies = [MetaStrategy(s) for s in self.setups]
        self.selecting = any(s.selector.enabled for s in self.strategies)  # Lambda patterns
        # Each run's books (rows, trackers, health, checkpoints, end), as a run alone keeps them.
        # The process's random generators stay: a batch draws from counter-based streams.
        self.ledgers = [RunLedger(c, d, "accuracy" if s.classification else "loss",
                                  resume=resume, rng=False)
                        for c, d, s in zip(self.cfgs, self.dirs, self.setups)]
        for ledger, c in zip(self.ledgers, self.cfgs):
            ledger.label = f"{c.name}: "
        self.first_round, self.resumed = 1, resume
        if resume:
            at = {ledger.resumed[0] for ledger in self.ledgers}
            if len(at) != 1:
                raise ValueError(f"the checkpoints of a batch must be after one round, got {at}")
            self.first_round = at.pop() + 1  # round 0 (the evaluation before training) is done
        self.results: dict[int, dict[str, Any]] = {}  # run index -> summary, once it ended
        self.live = list(range(len(self.cfgs)))  # run indices along the batch axis
        self.progress = Progress(self.rounds, quiet=quiet,
                                 label=f"round ({len(self.cfgs)} runs)")
        self._tasks: list[dict[int, list[Task]]] = [{} for _ in self.cfgs]
        #: per run, each client's example count once known (-1: not yet), see _example_counts
        self._counts: list[np.ndarray] = [np.full(s.federation.num_clients, -1, dtype=np.int64)
                                          for s in self.setups]
        fed = self.cfgs[0].federated
        n = first.federation.num_clients
        # The per-run state along the batch axis.
        self.w = stack([s.initial_params for s in self.setups])
        self.w_before = self.w
        self.optimizer = ServerOptimizer(
            fed.server_optimizer, torch.tensor([c.federated.server_lr for c in self.cfgs],
                                               dtype=torch.float64),
            fed.server_momentum, (fed.adam_beta1, fed.adam_beta2), fed.adam_eps,
            steps=torch.zeros(len(self.cfgs), dtype=torch.float64))
        self.memory: Params = {}
        self.has_memory = np.zeros((len(self.cfgs), n), dtype=bool)
        if self.algorithm.uses_memory:
            tasks = self.cfgs[0].data.tasks_per_client
            self.memory = {k: v.new_zeros((len(self.cfgs), n, tasks, *v.shape[1:]))
                           for k, v in self.w.items()}
        self.initial = self.w  # the initial models (memory_init: initial_model); w is replaced
        self.values = {name: torch.tensor(
            [float(getattr(s.hyper if name == "eta" else s.hyper.step, name)) for s in self.setups],
            dtype=torch.float32) for name in _VALUES}
        self.alpha_all = self.values["alpha"].clone()  # by run index (values follow the live runs)
        self._etas: dict[tuple, torch.Tensor] = {}
        self.seeds = np.asarray([c.seed for c in self.cfgs], dtype=np.int64)
        # Bookkeeping by run index (rows of finished runs stay): the rounds of each client's last
        # participation (each strategy's Staleness reads its row: a view), the clients with a
        # valid update, and the running totals of a metrics row.
        self.last = np.full((len(self.cfgs), n), -1, dtype=np.int64)
        for i, s in enumerate(self.strategies):
            s.staleness.last = self.last[i]
        self.gaps: list[list[np.ndarray]] = [[] for _ in self.cfgs]  # not yet in the histograms
        self.trained = np.zeros((len(self.cfgs), n), dtype=bool)
        self.totals = {k: np.zeros(len(self.cfgs), dtype=np.int64)
                       for k in ("samples", "bytes_up", "bytes_down")}
        self.pending: list[dict[str, Any]] = []  # trained rounds whose rows are not written yet
        self.seconds = 0.0
        like = first.initial_params
        self.bytes_down, self.bytes_up = R.to_record(like).count_bytes(), R.row_bytes(like)
        self.evaluator = BatchEvaluator(self)
        self.until_round: int | None = None  # run(until_round): where this call stops
        if resume:
            self._restore()

    # -- the run loop ---------------------------------------------------------------------------
    def run(self, until_round: int | None = None) -> dict[int, dict[str, Any]]:
        """Run every round; return each run's summary (by its index in ``configs``).
        ``until_round``: stop after that round as a stop request does (every live run checkpoints
        and ends ``interrupted``), so that a tuner can look at the runs and resume some of them."""
        self.until_round = until_round
        self.start = time.perf_counter() - self.seconds
        try:
            with collector.frozen(), self.progress:
                if not self.resumed:
                    self._log(0, evaluate=True)
                for server_round in range(self.first_round, self.rounds + 1):
                    if not self.live:
                        break
                    with collector.paused():
                        alarm = self._train_round(server_round)
                    self._select(server_round)
                    evaluate = self.strategies[self.live[0]].is_eval_round(server_round)
                    self._log(server_round, evaluate=evaluate, alarm=alarm)
                    self.progress.update(server_round, f"{len(self.live)} runs going")
        except BaseException as e:  # a crash: the trackers' runs end too, as what happened
            for i in self.live:
                self.ledgers[i].abort(e)
            raise
        for i in list(self.live):
            self._finish(i, "completed", "")
        return self.results

    def _train_round(self, server_round: int) -> bool:
        """One round of every live run: sample, draw, update, average, step. The round's numbers
        join the pending rows; returns whether a run must be looked at now (it diverged, or no
        update of it was finite)."""
        live = self.live
        R_, start = len(live), time.perf_counter()
        runs = np.asarray(live)
        cids, present = self._cohorts(server_round, runs)  # [R, C] each
        C = cids.shape[1]
        self._participate(server_round, runs, cids, present)
        cfg = self.cfgs[live[0]]
        # injected faults, decided per (seed, client, round) as in the run alone (client library)
        codes = fault_codes(fault_rates(cfg), self.seeds[runs][:, None], cids, server_round)
        training = trains(codes) & present  # [R, C]: failed, dropped-out clients do no work
        tasks = [self._client_tasks(i, c) for i, row in zip(live, cids.tolist()) for c in row]
        keys = round_keys(self.seeds[runs], cids, server_round).reshape(-1)
        groups = self._pattern_groups()
        hp = groups[0][1]  # the patterns do not change what a round draws
        data = draw_cohort_data(self.setups[live[0]], hp, tasks, keys, fresh=False)
        runs_at = torch.from_numpy(runs).repeat_interleave(C)  # run index of every flat client
        cols = torch.from_numpy(cids.reshape(-1))
        slots = runs_at * self.has_memory.shape[1] + cols  # rows of the flattened memories
        fresh = (memory_init_mask(self.algorithm.uses_memory, hp,
                                  self.has_memory[runs[:, None], cids]) & training).reshape(-1)
        for at, hp_ in groups if fresh.any() else ():  # with each run's memory pattern
            first = np.flatnonzero(fresh & np.isin(np.arange(R_ * C) // C, at))
            if len(first):
                self._initialise(first, tasks, keys, hp_, runs_at, cols)
        values = dict(self.values, eta=self._eta(server_round))
        memory = ({k: v.flatten(0, 1).index_select(0, slots).reshape(R_, C, *v.shape[2:])
                   for k, v in self.memory.items()} if self.memory else None)
        shaped = RoundData(*(_unflatten(x, R_, C) for x in
                             (data.task_index, data.support, data.query, data.extra)))
        delta, new_memory, metrics = self._update(groups, memory, shaped, values)
        delta = clip_client_updates(cfg, delta, client_axes=2)
        if new_memory is not None:
            moved = training.reshape(-1)  # a client that did no work keeps its memory
            at = None if moved.all() else torch.from_numpy(np.flatnonzero(moved))
            for k, v in new_memory.items():  # flatten(0, 1) of the contiguous store is a view
                v = v.reshape(R_ * C, *v.shape[2:])
                self.memory[k].flatten(0, 1).index_copy_(
                    0, slots if at is None else slots[at], v if at is None else v[at])
            self.has_memory[runs_at.numpy()[moved], cols.numpy()[moved]] = True
        # each client's share of the batch's time, times its simulated speed; judged against the
        # round deadline as the run alone's engine judges it
        seconds = simulated_seconds(cfg.participation, self.seeds[runs], cids,
                                    (time.perf_counter() - start) / (R_ * C))
        arrived = arrives(codes, past_deadline(cfg, seconds, clock=True)) & present
        codes = np.where(present, codes, NONE)  # padding (client 0 again) draws no fault
        self._note_failures(server_round, runs, cids, codes)
        return self._apply(server_round, runs, cids, delta, metrics, fresh.reshape(R_, C),
                           samples_drawn(data) // (R_ * C), codes, arrived, seconds, present)

    def _pattern_groups(self) -> list[tuple[np.ndarray, Hyper]]:
        """The live runs (batch positions) grouped by the patterns they train with, each group with
        its hyperparameters: the config's, or those a run's pattern selection switched to, as its
        clients take them from a train instruction (``hyper_for``)."""
        if not self.selecting:  # every round of most batches: skip the per-run look
            return [(np.arange(len(self.live)), self.setups[self.live[0]].hyper)]
        groups: dict[tuple, tuple[list[int], Hyper]] = {}
        for j, i in enumerate(self.live):
            patterns = self.strategies[i].selector.train_config()
            key = tuple(sorted(patterns.items()))
            if key not in groups:
                groups[key] = ([], hyper_for(self.setups[i].hyper, patterns, self.setups[i]))
            groups[key][0].append(j)
        return [(np.asarray(at), hp) for at, hp in groups.values()]

    def _update(self, groups: list[tuple[np.ndarray, Hyper]], memory: Params | None,
                data: RoundData, values: dict[str, torch.Tensor]
                ) -> tuple[Params, Params | None, dict[str, torch.Tensor]]:
        """The client library's ``runs_update``: one vmapped call when every run trains with the
        same patterns; otherwise one call per group (a pattern is the update's structure, which one
        call cannot vary), put back in batch order."""
        if len(groups) == 1:
            return self._runs_update(groups[0][1], self.w, memory, data, values)
        parts = []
        for at, hp in groups:
            index = torch.from_numpy(at)
            w, mem, vals = (_take(x, index) for x in (self.w, memory, values))
            part = RoundData(*(_take(x, index) for x in (data.task_index, data.support,
                                                          data.query, data.extra)))
            parts.append(self._runs_update(hp, w, mem, part, vals))
        order = torch.argsort(torch.from_numpy(np.concatenate([at for at, _ in groups])))
        return tuple(None if part[0] is None else  # type: ignore[return-value]
                     {k: torch.cat([p[k] for p in part]).index_select(0, order) for k in part[0]}
                     for part in zip(*parts))

    def _select(self, server_round: int) -> None:
        """Each run's Lambda-pattern selection when it is due, by its own selector on its own
        ``w``, after the round's update and before its evaluation (as the strategy of a run alone
        selects). Federated mode asks the run's own ClientApp through an in-process grid, as a run
        alone on the in-process engine asks it; the table goes on the round's row."""
        for j, i in enumerate(self.live):
            selector = self.strategies[i].selector
            if not selector.due(server_round):
                continue
            cfg, fed = self.cfgs[i], self.setups[i].federation
            claim_task_identity()  # selection messages take their ids from it
            grid = InProcessGrid(make_client_app(cfg), fed.num_clients + fed.num_unseen)
            timeout = cfg.federated.round_timeout or None
            record = selector.run(_row(self.w, j), server_round,
                                  lambda ms: exchange(grid, ms, timeout,
                                                      cfg.federated.poll_interval),
                                  grid.partition_nodes())
            self.pending[-1].setdefault("selection", {})[i] = record

    def _note_failures(self, server_round: int, runs: np.ndarray, cids: np.ndarray,
                       codes: np.ndarray) -> None:
        """Each run's last client error (its health's message when failures stop it), as the
        strategy of the run alone notes an injected failure."""
        for i, row, code in zip(runs.tolist(), cids.tolist(), codes.tolist()):
            failed = [c for c, k in zip(row, code) if k == FAIL]
            if failed:
                e = fail(failed[-1], server_round)
                self.strategies[i].last_error = f"client error: {type(e).__name__}: {e}"

    def _cohorts(self, server_round: int, runs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[R, C]`` each: every run's sampled clients and which entries hold one. Uniform fixed-size
        cohorts are drawn for all runs at once; under an availability model or Poisson sampling
        each run's strategy draws its own (as in the run alone; sizes vary), padded to the largest
        with entries that are not there (client 0, which does no work and counts nowhere)."""
        strategy = self.strategies[runs[0]]
        n = strategy.setup.federation.num_clients
        cfg = self.cfgs[runs[0]]
        if cfg.federated.mode == "cross_silo":
            return np.tile(np.arange(n), (len(runs), 1)), np.ones((len(runs), n), dtype=bool)
        if cfg.participation.model == "uniform" and cfg.federated.sampling == "fixed":
            cids = sample_cohorts(self.seeds[runs], server_round, n, strategy.cohort_size())
            return cids, np.ones(cids.shape, dtype=bool)
        picked = [self.strategies[i].cohort_of(server_round) for i in runs.tolist()]
        size = max(1, max(len(p) for p in picked))  # vmap needs a client axis of one at least
        cids = np.zeros((len(runs), size), dtype=np.int64)
        present = np.zeros((len(runs), size), dtype=bool)
        for j, p in enumerate(picked):
            cids[j, :len(p)], present[j, :len(p)] = p, True
        return cids, present

    def _participate(self, server_round: int, runs: np.ndarray, cids: np.ndarray,
                     present: np.ndarray) -> None:
        """The staleness bookkeeping of :meth:`Staleness.record` for every run at once."""
        rows = runs[:, None]
        prev = self.last[rows, cids]
        gaps = np.where(prev < 0, 0, server_round - prev)
        if present.all():  # the usual round: every entry is a sampled client
            self.last[rows, cids] = server_round
            for i, g in zip(runs.tolist(), gaps):
                self.gaps[i].append(g)
            return
        self.last[np.broadcast_to(rows, cids.shape)[present], cids[present]] = server_round
        for i, g, here in zip(runs.tolist(), gaps, present):
            self.gaps[i].append(g[here])

    def _eta(self, server_round: int) -> torch.Tensor:
        """Each live run's step size this round (its schedule, ``eta_for_round``)."""
        key = (tuple(self.live), self.setups[self.live[0]].eta_for_round(server_round)
               == self.cfgs[self.live[0]].algorithm.eta)
        eta = self._etas.get(key)
        if eta is None:
            self._etas.clear()
            eta = self._etas[key] = torch.tensor(
                [self.setups[i].eta_for_round(server_round) for i in self.live],
                dtype=torch.float32)
        return eta

    def _apply(self, server_round: int, runs: np.ndarray, cids: np.ndarray, delta: Params,
               metrics: dict[str, torch.Tensor], fresh: np.ndarray, per_client: int,
               codes: np.ndarray, arrived: np.ndarray, seconds: np.ndarray,
               present: np.ndarray) -> bool:
        """Average each run's finite updates that arrived (``arrived``: the client library's
        faults and deadline), step its server optimizer; the round's numbers join the pending rows.
        Returns whether a run diverged or had no valid update."""
        cfg = self.cfgs[runs[0]]
        weighted = cfg.federated.aggregation == "weighted"
        every = bool(present.all())
        clients = cids.tolist() if every else [row[h].tolist() for row, h in zip(cids, present)]
        errors = (codes == FAIL).sum(1)
        done = aggregate_round(
            self.w, self.optimizer, delta, torch.from_numpy(arrived), clients,
            weighting=cfg.federated.aggregation, min_replies=cfg.federated.min_replies,
            counts=torch.from_numpy(self._example_counts(runs, cids)) if weighted else None,
            failed=[["error"] * n for n in errors.tolist()],
            missing=(present.sum(1) - arrived.sum(1) - errors).tolist(),
            privacy=[self.strategies[i].privacy for i in runs.tolist()], round_number=server_round,
            rule=self.algorithm.server_update if has_server_rule(self.algorithm) else None)
        keep, finite = done.moved, done.accepted
        if bool(keep.any()):
            self.w_before = {k: torch.where(per_run(keep, v), v, self.w_before[k])
                             for k, v in self.w.items()}
            self.w = done.w
        valid = finite.sum(1)
        finite_np = finite.numpy()
        at, col = np.nonzero(finite_np)  # padding (a repeated id) must not write
        self.trained[runs[at], cids[at, col]] = True
        n_valid = valid.to(torch.float64).clamp_min(1)
        zero = torch.zeros((), dtype=torch.float64)
        losses = {}  # the mean over the valid clients (a rejected client's loss may be NaN)
        for key in TRAIN_METRICS:  # in the order a run alone writes them
            v = metrics.get(key.replace("-", "_"))
            if v is not None:
                losses[key] = (torch.where(finite, v.to(torch.float64), zero).sum(1)
                               / n_valid).numpy()
        init = cfg.data.tasks_per_client * self.setups[runs[0]].hyper.init_support_size
        samples = ((per_client + init * fresh) * finite_np).sum(1)
        self.totals["samples"][runs] += samples
        self.totals["bytes_down"][runs] += self.bytes_down * present.sum(1)
        self.totals["bytes_up"][runs] += self.bytes_up * arrived.sum(1)
        seconds_max = np.where(finite_np, seconds, -np.inf).max(1)
        # Python lists: a row per run is read out of them, a value at a time
        self.pending.append({"round": server_round, "runs": runs, "position": _positions(runs),
                             "records": done.records,
                             "available": [self.strategies[i].available for i in runs.tolist()],
                             "injected": injected_counts(codes),
                             "losses": {k: v.tolist() for k, v in losses.items()},
                             "samples": samples.tolist(),
                             "train_seconds_max": seconds_max.tolist(),
                             "totals": {k: v[runs].tolist() for k, v in self.totals.items()},
                             "seconds": time.perf_counter() - self.start})
        diverged = any(r.diverged is not None for r in done.records)
        return diverged or bool((valid == 0).any())

    def _log(self, server_round: int, evaluate: bool = False, alarm: bool = False) -> None:
        """Write the pending rows when due: at evaluation and checkpoint rounds, when a run needs
        its health checked now (``alarm``), at a stop request, every few hundred rounds and at the
        end; each run's rows are written, tracked and checked by its health rules in order."""
        stop = checkpoint.stop_requested() or server_round == self.until_round
        due = [i for i in self.live if self.ledgers[i].checkpoint_due(server_round, stop)]
        if not (evaluate or alarm or due or stop or server_round in (0, self.rounds)
                or len(self.pending) >= _FLUSH_ROUNDS):
            return
        evals = self.evaluator.evaluate(server_round) if evaluate else {}
        pending, self.pending = self.pending, []
        if server_round == 0:
            runs = np.asarray(self.live)
            pending = [{"round": 0, "runs": runs, "position": _positions(runs),
                        "totals": {k: v[runs].tolist() for k, v in self.totals.items()}}]
        if evaluate:  # the round's clock includes its evaluation, as a run alone's does
            pending[-1]["seconds"] = time.perf_counter() - self.start
        ended: list[tuple[int, RunStopped]] = []
        # the faults section is the same for every run of a batch (batch_key)
        faulty = faults_enabled(self.cfgs[self.live[0]])
        for i in list(self.live):
            rows = []
            for p in pending:
                row = _row_of(p, p["position"][i])
                if p["round"] == server_round and i in evals:
                    row.eval = evals[i]
                row.pattern_selection = p.get("selection", {}).get(i)
                if p["round"] > 0 and faulty:  # drawn once, this round
                    row.injected = dict(p["injected"][p["position"][i]])
                rows.append(row)
            try:
                self.ledgers[i].record(rows, self.strategies[i].last_error)
            except RunStopped as e:
                ended.append((i, e))
            finally:
                self.strategies[i].round_stats = {}
        for i, e in ended:
            self._finish(i, e.status, e.message, distrust_w=e.distrust_w)
        for i in self.live:  # in the format a run alone writes (memories as a memory bank)
            if self.ledgers[i].checkpoint_due(server_round, stop):
                self.ledgers[i].save_checkpoint(server_round, self._server_state(i),
                                                {"bank": self._bank_state(i)})
        if stop and server_round < self.rounds:
            for i in list(self.live):
                self._finish(i, "interrupted", f"interrupted after round {server_round}; resume "
                             "with the same fedmaml sweep command")

    # -- pieces -----------------------------------------------------------------------------------
    def _client_tasks(self, i: int, cid: int) -> list[Task]:
        """Run ``i``'s client ``cid``'s tasks (kept for small federations; large ones ask their
        federation, which caches what it builds)."""
        tasks = self._tasks[i].get(cid)
        if tasks is None:
            tasks = self.setups[i].federation.client_tasks(cid)
            if len(self._tasks[i]) < _TASK_CACHE:
                self._tasks[i][cid] = tasks
        return tasks

    def _example_counts(self, runs: np.ndarray, cids: np.ndarray) -> np.ndarray:
        """``[R, C]`` float64: each sampled client's example count (its update's weight). A
        client's tasks, and so its count, are fixed for the run: each is counted once, the first
        time the client is sampled, not every round."""
        out = np.empty(cids.shape, dtype=np.float64)
        for j, i in enumerate(runs.tolist()):
            known = self._counts[i]
            for c in np.unique(cids[j][known[cids[j]] < 0]).tolist():
                known[c] = example_counts([self._client_tasks(i, c)])[0]
            out[j] = known[cids[j]]
        return out

    def _initialise(self, at: np.ndarray, tasks: list[list[Task]], keys: np.ndarray, hp: Hyper,
                    runs_at: torch.Tensor, cols: torch.Tensor) -> None:
        """First memories of the clients at flat positions ``at``: ``A(w; S_0)`` from their run's
        ``w_r`` (or initial model, ``memory_init: initial_model``), as ``client_update`` makes them."""
        init = draw_init([tasks[a] for a in at], hp, keys[at])
        pick = torch.from_numpy(at)
        runs = runs_at[pick]  # run indices
        if hp.memory_init == "initial_model":
            start = {k: v[runs] for k, v in self.initial.items()}
        else:
            position = torch.full((len(self.cfgs),), -1, dtype=torch.int64)
            position[torch.tensor(self.live)] = torch.arange(len(self.live))
            start = {k: v[position[runs]] for k, v in self.w.items()}
        memory = initial_memories(self.algorithm, self.model, self.loss_fn, hp, start, init,
                                  self.alpha_all[runs])
        for k, v in memory.items():
            self.memory[k][runs, cols[pick]] = v
        self.has_memory[runs.numpy(), cols[pick].numpy()] = True

    # -- ending, checkpoints ----------------------------------------------------------------------
    def _finish(self, i: int, status: str, message: str, distrust_w: bool = False) -> None:
        """End run ``i`` in its ledger (summary, model.pt: the last good model, figure, trackers);
        it leaves the batch."""
        j = self.live.index(i)
        self.sync_staleness(i)  # the summary's participation
        model = _row(self.w_before if distrust_w else self.w, j)
        self.results[i] = self.ledgers[i].finish(
            status, message, model, self.strategies[i].summary_parts(),
            extra={"batch": {"runs": len(self.cfgs), "engine": "fedmaml sweep --vectorize"}})
        self._drop(j)

    def _drop(self, j: int) -> None:
        """Remove the run at batch position ``j`` from every per-run tensor."""
        keep = torch.tensor([p for p in range(len(self.live)) if p != j], dtype=torch.int64)
        del self.live[j]
        opt = self.optimizer
        self.w, self.w_before, self.values, opt.state, opt.lr, opt.steps = _take(
            (self.w, self.w_before, self.values, opt.state, opt.lr, opt.steps), keep)
        self._etas.clear()

    def _server_state(self, i: int) -> ServerState:
        """Run ``i``'s server state, from the batch's tensors (the participation staleness, the
        selector and the privacy account are its strategy's own)."""
        self.sync_staleness(i)
        j = self.live.index(i)
        return dataclasses.replace(
            self.strategies[i].export_state(), w=_row(self.w, j),
            w_before_update=_row(self.w_before, j),
            optimizer_state=_row(self.optimizer.state, j),
            optimizer_steps=int(self.optimizer.steps[j]),
            trained=np.flatnonzero(self.trained[i]).tolist(),
            touched=np.flatnonzero(self.last[i] >= 0).tolist(),
            totals={k: int(v[i]) for k, v in self.totals.items()})

    def sync_staleness(self, i: int) -> None:
        """Run ``i``'s strategy's staleness gets the participations the batch counted since (its
        evaluation and summary read it)."""
        staleness = self.strategies[i].staleness
        if self.gaps[i]:
            staleness.add_gaps(np.concatenate(self.gaps[i]))
            self.gaps[i] = []
        staleness.last_round = int(self.last[i].max(initial=0))

    def _bank_state(self, i: int) -> dict[str, Any]:
        """Run ``i``'s memories in a memory bank's checkpoint form."""
        ids = np.flatnonzero(self.has_memory[i]) if self.memory else np.zeros(0, dtype=np.int64)
        index = torch.from_numpy(ids.astype(np.int64))
        return bank_state(self.has_memory.shape[1], index,
                          {k: v[i].index_select(0, index).clone() for k, v in self.memory.items()})

    def _restore(self) -> None:
        """Every run's state from its checkpoint, as its ledger read it (as a run alone resumes)."""
        states = []
        for i, ledger in enumerate(self.ledgers):
            _, _, state, memories = ledger.resumed
            states.append(state)
            strategy = self.strategies[i]
            strategy.import_state(state)  # its staleness, selector and privacy account
            self.last[i] = strategy.staleness.last
            strategy.staleness.last = self.last[i]
            self.trained[i, state.trained] = True
            for k in self.totals:
                self.totals[k][i] = int(state.totals[k])
            bank = memories.get("bank")
            if bank is None and "clients" in memories:  # another engine's checkpoint
                bank = checkpoint.clients_to_bank(memories["clients"], self.has_memory.shape[1])
            if self.memory:
                if bank is None:
                    raise ValueError(f"{self.dirs[i]}: the checkpoint holds references to memory "
                                     "files on devices; resume it alone")
                ids = bank["client_ids"].to(torch.int64)
                for k, v in bank["memory"].items():
                    self.memory[k][i, ids] = v
                self.has_memory[i, ids.numpy()] = True
        self.w = stack([s.w for s in states])
        self.w_before = stack([s.w_before_update for s in states])
        self.optimizer.state = stack([s.optimizer_state for s in states])
        self.optimizer.steps = torch.tensor([float(s.optimizer_steps) for s in states],
                                            dtype=torch.float64)
        self.seconds = max(ledger.resumed[1] for ledger in self.ledgers)


def _row_of(pending: dict[str, Any], j: int) -> MetricsRow:
    """Run ``j``'s metrics row of a pending round."""
    totals = pending["totals"]
    row = MetricsRow(pending["round"], samples=totals["samples"][j],
                     bytes_up=totals["bytes_up"][j], bytes_down=totals["bytes_down"][j],
                     seconds=pending["seconds"])
    if pending["round"] > 0:
        record = pending["records"][j]
        row.available = pending["available"][j]
        for k, v in record.row().items():
            setattr(row, k, v)
        if record.replies:
            row.set_train({**{k: v[j] for k, v in pending["losses"].items()},
                           "train-seconds-max": pending["train_seconds_max"][j]})
    return row


def _positions(runs: np.ndarray) -> dict[int, int]:
    """``{run: its row in a round's arrays}`` (one dict a round; each run's row reads it)."""
    return {i: j for j, i in enumerate(runs.tolist())}


def _take(x: Any, index: torch.Tensor) -> Any:
    """The runs ``index`` of ``x`` (a tensor, a dict or a pair of them along the run axis; ``None``
    stays)."""
    if x is None:
        return None
    if isinstance(x, dict):
        return {k: v.index_select(0, index) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_take(t, index) for t in x)
    return x.index_select(0, index)


def _unflatten(x: Any, runs: int, clients: int) -> Any:
    """``[R * C, ...]`` -> ``[R, C, ...]`` (a batch pair too; ``None`` stays)."""
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(_unflatten(t, runs, clients) for t in x)
    return x.reshape(runs, clients, *x.shape[1:])


def run_batch(configs: Sequence[Config], run_dirs: Sequence[str | Path], quiet: bool = True,
              resume: bool = False, until_round: int | None = None) -> dict[int, dict[str, Any]]:
    """Train ``configs`` as one :class:`RunBatch`; return each run's summary by index. A tracking
    store that cannot start is tried for the first run only (one_attempt_per_store)."""
    with one_attempt_per_store():
        return RunBatch(configs, run_dirs, quiet=quiet, resume=resume).run(until_round)
