"""Many runs of equal shapes as one computation: the engine of ``fedmaml sweep --vectorize``.

A sweep's runs often differ only in numbers: seeds and continuous hyperparameters (``eta``,
``beta``, ``alpha``, ``hf_delta``, the server's learning rate). For the small models of
meta-learning research one run's round is a few milliseconds of tiny tensor operations, so running
them one after another is bound by Python and dispatch overhead. A :class:`RunBatch` stacks ``R``
such runs along a leading run axis and takes every round of all of them at once:

1. each run samples its cohort with its own strategy (:class:`MetaStrategy`: the seeded
   participation stream and the staleness bookkeeping of a run alone);
2. the ``R x C`` clients draw their round data in one call (``draw_cohort``: counter-based streams
   keyed by each run's ``(seed, client, round)``, so a client's data equals its draw in the run
   alone); first participations draw their memory initialisation apart and initialise it first;
3. one call of :func:`~fedmaml.engines.vectorized.cohort_update` vmapped over the runs (itself
   vmapped over each run's cohort) with each run's ``w``, memories and hyperparameters as tensors;
4. per run: updates holding NaN/inf are rejected, the rest averaged (uniform or by examples) and
   stepped by the server optimizer with the run's own rate and state, a non-finite ``w`` kept out;
5. every run writes its own run directory as :func:`~fedmaml.federated.server_app.run_federated`
   does: the same metrics.jsonl rows (``seconds`` is the batch's clock), summary.json with its own
   status, model.pt, convergence.png, checkpoints and tracking. A run that diverges (or fails) ends
   there with its status and leaves the batch; the others go on.

Evaluation rounds evaluate each run's panel client by client with the ClientApp's own
``evaluate_client``, summarised by the strategy's own code, so the ``eval`` rows equal the run
alone's. Memories live in one dense tensor per parameter, ``[R, clients, tasks, ...]``; a checkpoint
writes each run's as a memory bank (the vectorized engine's format), so one run of a batch can also
be resumed alone (``fedmaml run --resume`` with ``engine.name: vectorized``).

What a batch cannot hold (:func:`batch_refusal`): injected faults, differential privacy, Poisson
client sampling, round deadlines, participation models other than uniform, compute-speed models,
pattern selection and ``compare_with`` baselines. ``fedmaml sweep --vectorize`` runs such runs one by one, as without it.
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
from fedmaml.algorithms import ALGORITHMS, Hyper, RoundData, get_algorithm, has_server_rule
from fedmaml.algorithms.base import draw_cohort, draw_init
from fedmaml.config import config_to_flat
from fedmaml.core.params import Params
from fedmaml.core.server import ServerOptimizer, per_run
from fedmaml.data.counter import derive_keys
from fedmaml.data.tasks import Task
from fedmaml.engines.batch_evaluation import BatchEvaluator
from fedmaml.engines.memory_bank import CHECKPOINT_FORMAT as BANK_FORMAT
from fedmaml.engines.vectorized import cohort_update, unbatchable_reason
from fedmaml.models.module import is_user_model
from fedmaml.federated import checkpoint
from fedmaml.federated import records as R
from fedmaml.federated.health import RunHealth, RunStopped, round_outcome
from fedmaml.federated.participation import sample_cohorts
from fedmaml.federated.server_app import (new_run_state, note_evaluation, run_health,
                                          run_summary)
from fedmaml.federated.setup import ExperimentSetup, resolve_device, setup_for
from fedmaml.federated.strategy import TRAIN_METRICS, MetaStrategy
from fedmaml.provenance import run_provenance
from fedmaml.results.plots import plot_run
from fedmaml.results.progress import Progress
from fedmaml.results.recorder import RunRecorder
from fedmaml.tracking import open_tracker

log = logging.getLogger("fedmaml")

#: Config keys whose values may differ between the runs of one batch: a run's identity and place,
#: its numbers (carried as tensors along the run axis), its evaluation (run per run), and settings
#: of the engines and of tracking that do not change a run's results.
PER_RUN_KEYS = ("name", "seed", "output_dir", "model.init_seed", "algorithm.eta", "algorithm.beta",
                "algorithm.alpha", "algorithm.hf_delta", "federated.server_lr",
                "federated.checkpoint_every", "federated.poll_interval")
_PER_RUN_PREFIXES = ("tracking.", "evaluation.", "engine.")
#: The hyperparameters a batch carries per run, as tensors ``[R]``.
_VALUES = ("eta", "alpha", "beta", "hf_delta")
#: Pending rows are written at least this often (rounds).
_FLUSH_ROUNDS = 200
#: Clients whose tasks a batch keeps at hand, per run.
_TASK_CACHE = 4096


def batch_refusal(cfg: Any) -> str | None:
    """Why ``cfg`` cannot run in a batch (``None``: it can)."""
    if cfg.compare_with:
        return "compare_with baselines run inside the run directory"
    if any((cfg.faults.fail, cfg.faults.straggle, cfg.faults.dropout)):
        return "faults are injected"
    if cfg.privacy.clipping != "none" or cfg.privacy.noise_multiplier > 0:
        return "differential privacy is on"
    if cfg.federated.sampling != "fixed":  # a batch draws one fixed-size cohort per run
        return "clients are Poisson-sampled (federated.sampling): cohorts vary in size"
    if cfg.federated.round_timeout:
        return "rounds have a deadline (federated.round_timeout)"
    if cfg.participation.model != "uniform" or cfg.participation.speed != "uniform":
        return "participation is not uniform (participation.model / participation.speed)"
    if cfg.pattern_selection.mode != "none":
        return "Lambda patterns are selected during the run (pattern_selection.mode)"
    # "cuda" joins no batch even where it is missing: the run alone is then refused up front with
    # the error every engine gives (federated.setup.check_device)
    if cfg.engine.device == "cuda" or resolve_device(cfg.engine.device).type != "cpu":
        return "batches run on the CPU"
    # A server rule sees one run's updates with their weights; a batch averages all runs at once
    # (rejected updates zeroed, not dropped), which only the mean can do the same way.
    if (cfg.algorithm.name not in ALGORITHMS  # no setup (data) built for the built-ins
            and has_server_rule(get_algorithm(cfg.algorithm.name, cfg.algorithm.kwargs))):
        return "the algorithm has its own server rule (server_update), which runs per run"
    # A user's module may be one vmap cannot batch (docs/custom.md); built-ins are written for it.
    problem = unbatchable_reason(setup_for(cfg)) if is_user_model(cfg.model.name) else None
    if problem is not None:
        return f"torch.func.vmap cannot batch the model ({problem})"
    return None


def batch_key(cfg: Any) -> tuple:
    """Runs with equal keys share every shape and rule and can run as one batch."""
    return tuple((k, repr(v)) for k, v in config_to_flat(cfg).items()
                 if k not in PER_RUN_KEYS and not k.startswith(_PER_RUN_PREFIXES))


def _stack(params: Sequence[Params]) -> Params:
    return {k: torch.stack([p[k] for p in params]) for k in params[0]}


def _row(params: Params, i: int) -> Params:
    return {k: v[i].clone() for k, v in params.items()}


class RunBatch:
    """``R`` runs of equal shapes (:func:`batch_key`) trained together, each into its run
    directory. ``resume``: continue every run from its checkpoint (all after the same round)."""

    def __init__(self, configs: Sequence[Any], run_dirs: Sequence[str | Path], *,
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
        threads = self.cfgs[0].engine.torch_threads  # as a ClientApp sets them (0: torch's)
        if threads and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        self.setups: list[ExperimentSetup] = [setup_for(c) for c in self.cfgs]
        first = self.setups[0]
        self.algorithm, self.model, self.loss_fn = first.algorithm, first.model, first.loss_fn
        self.rounds = self.cfgs[0].federated.rounds
        self.strategies = [MetaStrategy(s) for s in self.setups]
        saved = [checkpoint.load(d) for d in self.dirs] if resume else [None] * len(self.dirs)
        self.first_round, self.resumed = 1, resume
        if resume:
            at = {s["round"] for s in saved}
            if len(at) != 1:
                raise ValueError(f"the checkpoints of a batch must be after one round, got {at}")
            self.first_round = at.pop() + 1  # round 0 (the evaluation before training) is done
        self.recorders = [RunRecorder(d, c, metrics=s["metrics"] if s else None)
                          for d, c, s in zip(self.dirs, self.cfgs, saved)]
        self.trackers = [open_tracker(c, d) for c, d in zip(self.cfgs, self.dirs)]
        self.healths: list[RunHealth] = [run_health(c) for c in self.cfgs]
        self.states: list[dict[str, Any]] = [new_run_state() for _ in self.cfgs]
        self.results: dict[int, dict[str, Any]] = {}  # run index -> summary, once it ended
        self.live = list(range(len(self.cfgs)))  # run indices along the batch axis
        self.progress = Progress(self.rounds, quiet=quiet,
                                 label=f"round ({len(self.cfgs)} runs)")
        self._tasks: list[dict[int, list[Task]]] = [{} for _ in self.cfgs]
        fed = self.cfgs[0].federated
        n = first.federation.num_clients
        # The per-run state along the batch axis.
        self.w = _stack([s.initial_params for s in self.setups])
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
        self.values = {name: torch.tensor([_value(s.hyper, name) for s in self.setups],
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
        if resume:
            self._restore(saved)

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
                    self._log(server_round, evaluate=self._eval_round(server_round), alarm=alarm)
                    self.progress.update(server_round, f"{len(self.live)} runs going")
        except BaseException as e:  # a crash: the trackers' runs end too, as what happened
            for i in self.live:
                self.trackers[i].abort("interrupted" if isinstance(e, KeyboardInterrupt)
                                       else "failed")
            raise
        for i in list(self.live):
            self._finish(i, "completed", "")
        return self.results

    def _eval_round(self, server_round: int) -> bool:
        return self.strategies[self.live[0]].is_eval_round(server_round)

    def _train_round(self, server_round: int) -> bool:
        """One round of every live run: sample, draw, update, average, step. The round's numbers
        join the pending rows; returns whether a run must be looked at now (it diverged, or no
        update of it was finite)."""
        live = self.live
        R_, start = len(live), time.perf_counter()
        runs = np.asarray(live)
        cids = self._cohorts(server_round, runs)  # [R, C]
        C = cids.shape[1]
        self._participate(server_round, runs, cids)
        tasks = [self._client_tasks(i, c) for i, row in zip(live, cids.tolist()) for c in row]
        keys = derive_keys(self.seeds[runs], cids, server_round).reshape(-1)
        hp = self.setups[live[0]].hyper
        data = draw_cohort(tasks, hp, keys, extra=self.algorithm.needs_extra_batch(hp), init=False)
        runs_at = torch.from_numpy(runs).repeat_interleave(C)  # run index of every flat client
        cols = torch.from_numpy(cids.reshape(-1))
        slots = runs_at * self.has_memory.shape[1] + cols  # rows of the flattened memories
        fresh = self._fresh(runs, cids).reshape(-1)
        if fresh.any():
            self._initialise(np.flatnonzero(fresh), tasks, keys, hp, runs_at, cols)
        values = dict(self.values, eta=self._eta(server_round))
        memory = ({k: v.flatten(0, 1).index_select(0, slots).reshape(R_, C, *v.shape[2:])
                   for k, v in self.memory.items()} if self.memory else None)
        shaped = RoundData(*(_unflatten(x, R_, C) for x in
                             (data.task_index, data.support, data.query, data.extra)))
        delta, new_memory, metrics = _runs_update(self.algorithm, self.model, self.loss_fn, hp,
                                                  self.w, memory, shaped, values)
        if new_memory is not None:
            for k, v in new_memory.items():  # flatten(0, 1) of the contiguous store is a view
                self.memory[k].flatten(0, 1).index_copy_(0, slots, v.reshape(R_ * C, *v.shape[2:]))
            self.has_memory[runs_at.numpy(), cols.numpy()] = True
        return self._apply(server_round, runs, cids, delta, metrics, fresh.reshape(R_, C),
                           _samples(data) // (R_ * C), start)

    def _cohorts(self, server_round: int, runs: np.ndarray) -> np.ndarray:
        """``[R, C]``: each run's sampled clients (its strategy's cohort, drawn for all at once)."""
        strategy = self.strategies[runs[0]]
        n = strategy.setup.federation.num_clients
        if self.cfgs[runs[0]].federated.mode == "cross_silo":
            return np.tile(np.arange(n), (len(runs), 1))
        return sample_cohorts(self.seeds[runs], server_round, n, strategy.cohort_size())

    def _participate(self, server_round: int, runs: np.ndarray, cids: np.ndarray) -> None:
        """The staleness bookkeeping of :meth:`Staleness.record` for every run at once."""
        rows = runs[:, None]
        prev = self.last[rows, cids]
        gaps = np.where(prev < 0, 0, server_round - prev)
        self.last[rows, cids] = server_round
        for i, g in zip(runs.tolist(), gaps):
            self.gaps[i].append(g)

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
               start: float) -> bool:
        """Average each run's finite updates, step its server optimizer; the round's numbers join
        the pending rows. Returns whether a run diverged or had no finite update."""
        C = cids.shape[1]
        finite = _finite_rows(delta)  # [R, C]
        cfg = self.cfgs[runs[0]]
        weights = (torch.from_numpy(self._example_counts(runs, cids))
                   if cfg.federated.aggregation == "weighted"
                   else torch.ones(cids.shape, dtype=torch.float64)) * finite
        valid = finite.sum(1)
        updated = valid >= cfg.federated.min_replies
        total = weights.sum(1).clamp_min(1e-300)
        if cfg.federated.aggregation == "uniform" and bool(finite.all()):  # the usual round
            mean = {k: v.sum(1) / C for k, v in delta.items()}
        else:
            mean = {k: _weighted_mean(v, weights.to(v.dtype), total.to(v.dtype))
                    for k, v in delta.items()}
        old_state, old_steps = dict(self.optimizer.state), self.optimizer.steps.clone()
        w = self.optimizer.step(self.w, mean)
        finite_w = _finite_rows({k: v.unsqueeze(1) for k, v in w.items()})[:, 0]
        keep = updated & finite_w
        if not bool(keep.all()):  # some runs do not move: their w and optimizer state stay
            w = {k: torch.where(per_run(keep, v), v, self.w[k]) for k, v in w.items()}
            self.optimizer.state = {k: torch.where(per_run(keep, v), v,
                                                   old_state.get(k, torch.zeros_like(v)))
                                    for k, v in self.optimizer.state.items()}
            self.optimizer.steps = torch.where(keep, self.optimizer.steps, old_steps)
        if bool(keep.any()):
            self.w_before = {k: torch.where(per_run(keep, v), v, self.w_before[k])
                             for k, v in self.w.items()}
            self.w = w
        finite_np = finite.numpy()
        self.trained[runs[:, None], cids] |= finite_np
        n_valid = valid.to(torch.float64).clamp_min(1)
        zero = torch.zeros((), dtype=torch.float64)
        losses = {}  # the mean over the valid clients (a rejected client's loss may be NaN)
        for key in TRAIN_METRICS:  # in the order a run alone writes them
            v = metrics.get(key.replace("-", "_"))
            if v is not None:
                losses[key] = (torch.where(finite, v.to(torch.float64), zero).sum(1)
                               / n_valid).numpy()
        init = self.cfgs[runs[0]].data.tasks_per_client * self.setups[runs[0]].hyper.init_support_size
        samples = ((per_client + init * fresh) * finite_np).sum(1)
        self.totals["samples"][runs] += samples
        self.totals["bytes_down"][runs] += self.bytes_down * C
        self.totals["bytes_up"][runs] += self.bytes_up * C
        diverged = (updated & ~finite_w).numpy()
        # Python lists: a row per run is read out of them, a value at a time
        self.pending.append({"round": server_round, "runs": runs, "position": _positions(runs),
                             "clients": cids.tolist(), "valid": valid.tolist(),
                             "updated": keep.tolist(), "diverged": diverged.tolist(),
                             "losses": {k: v.tolist() for k, v in losses.items()},
                             "samples": samples.tolist(),
                             "train_seconds_max": (time.perf_counter() - start) / (len(runs) * C),
                             "totals": {k: v[runs].tolist() for k, v in self.totals.items()},
                             "seconds": time.perf_counter() - self.start})
        return bool(diverged.any() or (valid == 0).any())

    def _log(self, server_round: int, evaluate: bool = False, alarm: bool = False) -> None:
        """Write the pending rows when due: at evaluation and checkpoint rounds, when a run needs
        its health checked now (``alarm``), at a stop request, every few hundred rounds and at the
        end; each run's rows are written, tracked and checked by its health rules in order."""
        stop = checkpoint.stop_requested() or server_round == getattr(self, "until_round", None)
        due = [i for i in self.live if self._checkpoint_due(i, server_round, stop)]
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
        for i in list(self.live):
            rows = []
            try:
                for p in pending:
                    row = _row_of(p, p["position"][i])
                    if p["round"] == server_round and i in evals:
                        row["eval"] = evals[i]
                        # the totals follow the evaluation; "samples" keeps its place when the
                        # round's own (train metrics) put it before
                        after = ("bytes_up", "bytes_down", "seconds") if "train_seconds_max" in row \
                            else ("samples", "bytes_up", "bytes_down", "seconds")
                        row.update({k: row.pop(k) for k in after})
                    rows.append(row)
                    self.healths[i].observe(row, self.strategies[i].last_error)
                    note_evaluation(self.states[i], row)
            except RunStopped as e:
                ended.append((i, e))
            finally:
                self.strategies[i].round_stats = {}
                self.recorders[i].log_rounds(rows)
                for row in rows:
                    self.trackers[i].log_round(row)
                if rows:
                    self.states[i]["seconds"] = rows[-1]["seconds"]
        for i, e in ended:
            self._finish(i, e.status, e.message, distrust_w=e.distrust_w)
        for i in self.live:
            if self._checkpoint_due(i, server_round, stop):
                self._save_checkpoint(i, server_round)
        if stop and server_round < self.rounds:
            for i in list(self.live):
                self._finish(i, "interrupted", f"interrupted after round {server_round}; resume "
                             "with the same fedmaml sweep command")

    def _checkpoint_due(self, i: int, server_round: int, stop: bool) -> bool:
        every = self.cfgs[i].federated.checkpoint_every
        return server_round < self.rounds and (stop or bool(every and server_round > 0
                                                            and server_round % every == 0))

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
        """``[R, C]`` float64: each sampled client's example count (its update's weight)."""
        return np.asarray([[sum(t.num_examples for t in self._client_tasks(i, c)) for c in row]
                           for i, row in zip(runs.tolist(), cids.tolist())], dtype=np.float64)

    def _fresh(self, runs: np.ndarray, cids: np.ndarray) -> np.ndarray:
        """``[R, C]``: does the client (re)initialise its memory this round?"""
        if not self.algorithm.uses_memory:
            return np.zeros(cids.shape, dtype=bool)
        if self.setups[runs[0]].hyper.memory_policy == "reinit":
            return np.ones(cids.shape, dtype=bool)
        return ~self.has_memory[runs[:, None], cids]

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
        alpha = self.alpha_all[runs]
        model, loss_fn, algorithm = self.model, self.loss_fn, self.algorithm

        def one(w_, x, y, a):
            step = dataclasses.replace(hp.step, alpha=a)
            return algorithm.initial_memory(model, loss_fn, dataclasses.replace(hp, step=step), w_,
                                            (x, y))

        memory = torch.func.vmap(one)(start, init[0], init[1], alpha)
        for k, v in memory.items():
            self.memory[k][runs, cols[pick]] = v
        self.has_memory[runs.numpy(), cols[pick].numpy()] = True

    # -- ending, checkpoints ----------------------------------------------------------------------
    def _finish(self, i: int, status: str, message: str, distrust_w: bool = False) -> None:
        """End run ``i``: its summary, model.pt (the last good model), figure and trackers; it
        leaves the batch."""
        j = self.live.index(i)
        cfg, strategy = self.cfgs[i], self.strategies[i]
        if status != "completed":
            (log.warning if status == "interrupted" else log.error)("%s: %s", cfg.name, message)
        self._sync_strategy(i)
        summary = run_summary(cfg, strategy, self.healths[i], self.states[i], status, message)
        summary["batch"] = {"runs": len(self.cfgs), "engine": "fedmaml sweep --vectorize"}
        model = _row(self.w_before if distrust_w else self.w, j)
        self.recorders[i].finish(summary, model, self.states[i]["provenance"])
        if status != "interrupted":
            checkpoint.remove(self.dirs[i])
        plot_run(self.dirs[i])
        self.trackers[i].finish(summary, self.dirs[i])
        self.results[i] = summary
        self._drop(j)

    def _drop(self, j: int) -> None:
        """Remove the run at batch position ``j`` from every per-run tensor."""
        keep = torch.tensor([p for p in range(len(self.live)) if p != j], dtype=torch.int64)
        del self.live[j]
        take = lambda p: {k: v.index_select(0, keep) for k, v in p.items()}  # noqa: E731
        self.w, self.w_before = take(self.w), take(self.w_before)
        self.optimizer.state = take(self.optimizer.state)
        self.optimizer.lr = self.optimizer.lr.index_select(0, keep)
        self.optimizer.steps = self.optimizer.steps.index_select(0, keep)
        self.values = take(self.values)
        self._etas.clear()

    def _save_checkpoint(self, i: int, server_round: int) -> None:
        """Run ``i``'s checkpoint, in the format a run alone writes (memories as a memory bank)."""
        strategy = self.strategies[i]
        self._sync_strategy(i)
        checkpoint.save(self.dirs[i], {
            "round": server_round, "seconds": self.states[i]["seconds"],
            "rng": checkpoint.rng_state(), "strategy": strategy.checkpoint_state(),
            "memories": {"bank": self._bank_state(i)}, "health": self.healths[i].state(),
            "app": self.states[i], "metrics": self.recorders[i].text()}, self.cfgs[i])

    def _sync_strategy(self, i: int) -> None:
        """Run ``i``'s strategy holds the batch's state of it (for a checkpoint or the summary)."""
        s = self.strategies[i]
        if i in self.live:
            j = self.live.index(i)
            s.w, s.w_before_update = _row(self.w, j), _row(self.w_before, j)
            s.optimizer.state = {k: v[j].clone() for k, v in self.optimizer.state.items()}
            s.optimizer.steps = int(self.optimizer.steps[j])
        s.totals = {k: int(v[i]) for k, v in self.totals.items()}
        s.touched = set(np.flatnonzero(self.last[i] >= 0).tolist())
        s.trained = set(np.flatnonzero(self.trained[i]).tolist())
        self._sync_staleness(i)

    def _sync_staleness(self, i: int) -> None:
        staleness = self.strategies[i].staleness
        if self.gaps[i]:
            staleness.add_gaps(np.concatenate(self.gaps[i]))
            self.gaps[i] = []
        staleness.last_round = int(self.last[i].max(initial=0))

    def _bank_state(self, i: int) -> dict[str, Any]:
        n = self.has_memory.shape[1]
        ids = np.flatnonzero(self.has_memory[i]) if self.memory else np.zeros(0, dtype=np.int64)
        index = torch.from_numpy(ids.astype(np.int64))
        return {"format": BANK_FORMAT, "num_clients": n, "client_ids": index,
                "memory": {k: v[i].index_select(0, index).clone() for k, v in self.memory.items()}}

    def _restore(self, saved: list[dict[str, Any]]) -> None:
        """Every run's state from its checkpoint (as ``run_federated`` resumes a run)."""
        for i, s in enumerate(saved):
            strategy = self.strategies[i]
            strategy.restore_state(s["strategy"])
            self.last[i] = strategy.staleness.last
            strategy.staleness.last = self.last[i]
            self.trained[i, sorted(strategy.trained)] = True
            self.healths[i].restore(s["health"])
            self.states[i] = s["app"]
            self.states[i]["provenance"] = run_provenance(s["app"].get("provenance"))
            for k in self.totals:
                self.totals[k][i] = int(strategy.totals[k])
            bank = s["memories"].get("bank")
            if bank is None and "clients" in s["memories"]:  # another engine's checkpoint
                bank = checkpoint.clients_to_bank(s["memories"]["clients"],
                                                  self.has_memory.shape[1])
            if self.memory:
                if bank is None:
                    raise ValueError(f"{self.dirs[i]}: the checkpoint holds references to memory "
                                     "files on devices; resume it alone")
                ids = bank["client_ids"].to(torch.int64)
                for k, v in bank["memory"].items():
                    self.memory[k][i, ids] = v
                self.has_memory[i, ids.numpy()] = True
        self.w = _stack([s.w for s in self.strategies])
        self.w_before = _stack([s.w_before_update for s in self.strategies])
        names = list(self.strategies[0].optimizer.state)
        self.optimizer.state = {k: torch.stack([s.optimizer.state[k] for s in self.strategies])
                                for k in names}
        self.optimizer.steps = torch.tensor([float(s.optimizer.steps) for s in self.strategies],
                                            dtype=torch.float64)
        self.seconds = max(float(s["seconds"]) for s in saved)


def _row_of(pending: dict[str, Any], j: int) -> dict[str, Any]:
    """Run ``j``'s metrics row of a pending round, keyed as ``MetaStrategy.start`` writes it."""
    row: dict[str, Any] = {"round": pending["round"]}
    if pending["round"] > 0:
        valid, clients = pending["valid"][j], pending["clients"][j]
        row.update(clients=clients, replies=valid,
                   **round_outcome(["rejected"] * (len(clients) - valid), 0),
                   updated=pending["updated"][j])
        if pending["diverged"][j]:
            row["diverged"] = ("the aggregated update is not finite (the model would hold NaN or "
                               "infinite values)")
        if valid:
            for key, v in pending["losses"].items():
                row[key.replace("-", "_")] = v[j]
            row["samples"] = pending["samples"][j]
            row["train_seconds_max"] = pending["train_seconds_max"]
    row.update({k: v[j] for k, v in pending["totals"].items()},
               seconds=pending["seconds"])
    return row


def _positions(runs: np.ndarray) -> dict[int, int]:
    """``{run: its row in a round's arrays}`` (one dict a round; each run's row reads it)."""
    return {i: j for j, i in enumerate(runs.tolist())}


def _finite_rows(params: Params) -> torch.Tensor:
    """``[R, C]`` bool: is every value of each row finite? (One sum per parameter first: when the
    sums are finite, so is every value, which spares the element-wise check.)"""
    sums = torch.stack([v.flatten(2).sum(-1) for v in params.values()])  # [P, R, C]
    ok = torch.isfinite(sums).all(0)
    if bool(ok.all()):
        return ok
    return torch.stack([torch.isfinite(v).flatten(2).all(-1) for v in params.values()]).all(0)


def _value(hp: Hyper, name: str) -> float:
    return float(hp.eta if name == "eta" else getattr(hp.step, name))


def _unflatten(x: Any, runs: int, clients: int) -> Any:
    """``[R * C, ...]`` -> ``[R, C, ...]`` (a batch pair too; ``None`` stays)."""
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(_unflatten(t, runs, clients) for t in x)
    return x.reshape(runs, clients, *x.shape[1:])


def _samples(data: RoundData) -> int:
    """Examples a round's step data holds over all its clients (the init batch apart)."""
    return sum(b[1].numel() for b in (data.support, data.query, data.extra) if b is not None)


def _weighted_mean(v: torch.Tensor, weights: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``sum_c weights[r, c] v[r, c] / total[r]`` for ``v`` ``[R, C, ...]``; rejected rows (weight 0)
    may hold NaN, so they are zeroed rather than multiplied."""
    wts = weights.reshape(weights.shape + (1,) * (v.dim() - 2))
    v = torch.where(wts > 0, v, torch.zeros((), dtype=v.dtype))
    return (wts * v).sum(1) / total.reshape((-1,) + (1,) * (v.dim() - 2))


def _runs_update(algorithm: Any, model: Any, loss_fn: Any, hp: Hyper, w: Params,
                 memory: Params | None, data: RoundData, values: dict[str, torch.Tensor]
                 ) -> tuple[Params, Params | None, dict[str, torch.Tensor]]:
    """:func:`cohort_update` vmapped over runs: ``w`` ``[R, ...]``, ``memory`` ``[R, C, ...]``,
    ``data`` ``[R, C, ...]`` and each hyperparameter of ``values`` ``[R]``."""
    def one(w_, memory_, task_index, support, query, extra, v):
        step = dataclasses.replace(hp.step, alpha=v["alpha"], beta=v["beta"],
                                   hf_delta=v["hf_delta"])
        hp_ = dataclasses.replace(hp, eta=v["eta"], step=step)
        delta, new_memory, metrics = cohort_update(
            algorithm, model, loss_fn, hp_, w_, memory_,
            RoundData(task_index, support, query, extra, None))
        return delta, ({} if new_memory is None else new_memory), metrics

    batched = lambda x: None if x is None else 0  # noqa: E731
    delta, new_memory, metrics = torch.func.vmap(
        one, in_dims=(0, batched(memory), 0, 0, 0, batched(data.extra), 0))(
        w, memory, data.task_index, data.support, data.query, data.extra, values)
    return delta, (new_memory or None), metrics


def run_batch(configs: Sequence[Any], run_dirs: Sequence[str | Path], quiet: bool = True,
              resume: bool = False, until_round: int | None = None) -> dict[int, dict[str, Any]]:
    """Train ``configs`` as one :class:`RunBatch`; return each run's summary by index."""
    return RunBatch(configs, run_dirs, quiet=quiet, resume=resume).run(until_round)
