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

What a batch cannot hold (:func:`batch_refusal`): injected faults, differential privacy, round
deadlines, participation models other than uniform, compute-speed models, pattern selection and
``compare_with`` baselines. ``fedmaml sweep --vectorize`` runs such runs one by one, as without it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fedmaml.algorithms import Hyper, RoundData
from fedmaml.algorithms.base import draw_cohort, draw_init, initial_memory
from fedmaml.config import config_to_flat
from fedmaml.core.params import Params
from fedmaml.core.server import ServerOptimizer, per_run
from fedmaml.data.tasks import Task
from fedmaml.engines.vectorized import cohort_update
from fedmaml import collector
from fedmaml.federated import checkpoint
from fedmaml.federated import records as R
from fedmaml.federated.client_app import evaluate_client
from fedmaml.federated.health import RunHealth, RunStopped, round_outcome
from fedmaml.federated.server_app import (new_run_state, note_evaluation, run_health,
                                          run_summary)
from fedmaml.federated.setup import ExperimentSetup, client_round_keys, resolve_device, setup_for
from fedmaml.federated.strategy import TRAIN_METRICS, MetaStrategy
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


def batch_refusal(cfg: Any) -> str | None:
    """Why ``cfg`` cannot run in a batch (``None``: it can)."""
    if cfg.compare_with.strip():
        return "compare_with baselines run inside the run directory"
    if any((cfg.faults.fail, cfg.faults.straggle, cfg.faults.dropout)):
        return "faults are injected"
    if cfg.privacy.clipping != "none" or cfg.privacy.noise_multiplier > 0:
        return "differential privacy is on"
    if cfg.federated.round_timeout:
        return "rounds have a deadline (federated.round_timeout)"
    if cfg.participation.model != "uniform" or cfg.participation.speed != "uniform":
        return "participation is not uniform (participation.model / participation.speed)"
    if cfg.pattern_selection.mode != "none":
        return "Lambda patterns are selected during the run (pattern_selection.mode)"
    if resolve_device(cfg.engine.device).type != "cpu":
        return "batches run on the CPU"
    return None


def batch_key(cfg: Any) -> tuple:
    """Runs with equal keys share every shape and rule and can run as one batch."""
    return tuple((k, repr(v)) for k, v in config_to_flat(cfg).items()
                 if k not in PER_RUN_KEYS and not k.startswith(_PER_RUN_PREFIXES))


def _stack(params: Sequence[Params]) -> Params:
    return {k: torch.stack([p[k] for p in params]) for k in params[0]}


def _row(params: Params, i: int) -> Params:
    return {k: v[i].clone() for k, v in params.items()}


class _DenseStore:
    """One client's memory store, a view of the batch's dense memories (for evaluation)."""

    def __init__(self, batch: "RunBatch", at: int, cid: int) -> None:
        self.batch, self.at, self.cid = batch, at, cid

    def load(self) -> Params | None:
        if not self.batch.has_memory[self.at, self.cid]:
            return None
        return {k: v[self.at, self.cid] for k, v in self.batch.memory.items()}


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
        self.initial = _stack([s.initial_params for s in self.setups])
        self.values = {name: torch.tensor([_value(s.hyper, name) for s in self.setups],
                                          dtype=torch.float32) for name in _VALUES}
        self.totals = [{"samples": 0, "bytes_up": 0, "bytes_down": 0} for _ in self.cfgs]
        self.seconds = 0.0
        like = first.initial_params
        self.bytes_down, self.bytes_up = R.to_record(like).count_bytes(), R.row_bytes(like)
        if resume:
            self._restore(saved)

    # -- the run loop ---------------------------------------------------------------------------
    def run(self) -> dict[int, dict[str, Any]]:
        """Run every round; return each run's summary (by its index in ``configs``)."""
        start = time.perf_counter() - self.seconds
        try:
            with collector.frozen(), self.progress:
                if not self.resumed:
                    self._evaluate_and_log(0, {i: {"round": 0} for i in self.live}, start)
                for server_round in range(self.first_round, self.rounds + 1):
                    if not self.live:
                        break
                    rows = self._train_round(server_round)
                    self._evaluate_and_log(server_round, rows, start)
                    self.progress.update(server_round, f"{len(self.live)} runs going")
        except BaseException as e:  # a crash: the trackers' runs end too, as what happened
            for i in self.live:
                self.trackers[i].abort("interrupted" if isinstance(e, KeyboardInterrupt)
                                       else "failed")
            raise
        for i in list(self.live):
            self._finish(i, "completed", "")
        return self.results

    def _train_round(self, server_round: int) -> dict[int, dict[str, Any]]:
        """One round of every live run: sample, draw, update, average, step; the rows' round part."""
        live = self.live
        cids = [self.strategies[i].clients_for_round(server_round) for i in live]
        for i, c in zip(live, cids):
            self.strategies[i].touched.update(c)
        start = time.perf_counter()
        C = len(cids[0])
        tasks = [self._client_tasks(i, c) for i, c in zip(live, cids) for c in c]
        keys = np.concatenate([client_round_keys(self.cfgs[i].seed, c, server_round)
                               for i, c in zip(live, cids)])
        hp = self.setups[live[0]].hyper
        data = draw_cohort(tasks, hp, keys, extra=self.algorithm.needs_extra_batch(hp), init=False)
        rows_at = torch.arange(len(live)).repeat_interleave(C)  # batch positions
        runs_at = torch.tensor(live).repeat_interleave(C)  # run indices (memories keep every run)
        cols = torch.tensor([c for cs in cids for c in cs], dtype=torch.int64)
        fresh = self._fresh(cids)
        if fresh.any():
            self._initialise(np.flatnonzero(fresh), tasks, keys, hp, rows_at, cols)
        values = {k: v for k, v in self.values.items()}
        values["eta"] = torch.tensor([self.setups[i].eta_for_round(server_round) for i in live],
                                     dtype=torch.float32)
        memory = ({k: v[runs_at, cols].reshape(len(live), C, *v.shape[2:])
                   for k, v in self.memory.items()} if self.memory else None)
        shaped = RoundData(*(_unflatten(x, len(live), C) for x in
                             (data.task_index, data.support, data.query, data.extra)))
        delta, new_memory, metrics = _runs_update(self.algorithm, self.model, self.loss_fn, hp,
                                                  self.w, memory, shaped, values)
        if new_memory is not None:
            for k, v in new_memory.items():
                self.memory[k][runs_at, cols] = v.reshape(len(live) * C, *v.shape[2:])
            self.has_memory[runs_at.numpy(), cols.numpy()] = True
        return self._apply(server_round, cids, delta, metrics, fresh.reshape(len(live), C),
                           samples=_samples(data, C * len(live)), start=start)

    def _apply(self, server_round: int, cids: list[list[int]], delta: Params,
               metrics: dict[str, torch.Tensor], fresh: np.ndarray, samples: int, start: float
               ) -> dict[int, dict[str, Any]]:
        """Average each run's finite updates, step its server optimizer, and write its row."""
        live, C = self.live, len(cids[0])
        finite = torch.stack([torch.isfinite(v).flatten(2).all(-1) for v in delta.values()]).all(0)
        counts = torch.tensor([[self._num_examples(i, c) for c in cs]
                               for i, cs in zip(live, cids)], dtype=torch.float64)
        weights = (counts if self.cfgs[live[0]].federated.aggregation == "weighted"
                   else torch.ones_like(counts)) * finite
        valid = finite.sum(1)
        updated = valid >= self.cfgs[live[0]].federated.min_replies
        total = weights.sum(1).clamp_min(1e-300)
        mean = {k: _weighted_mean(v, weights.to(v.dtype), total.to(v.dtype))
                for k, v in delta.items()}
        old_state, old_steps = dict(self.optimizer.state), self.optimizer.steps.clone()
        w = self.optimizer.step(self.w, mean)
        finite_w = torch.stack([torch.isfinite(v).flatten(1).all(-1) for v in w.values()]).all(0)
        keep = updated & finite_w
        if not bool(keep.all()):  # some runs do not move: their w and optimizer state stay
            w = {k: torch.where(per_run(keep, v), v, self.w[k]) for k, v in w.items()}
            self.optimizer.state = {k: torch.where(per_run(keep, v), v, old_state.get(k, 0 * v))
                                    for k, v in self.optimizer.state.items()}
            self.optimizer.steps = torch.where(keep, self.optimizer.steps, old_steps)
        moved = keep.any()
        if bool(moved):
            self.w_before = {k: torch.where(per_run(keep, v), v, self.w_before[k])
                             for k, v in self.w.items()}
            self.w = w
        seconds = (time.perf_counter() - start) / (len(live) * C)
        losses = {k.replace("_", "-"): v.tolist() for k, v in metrics.items()}
        finite_l, valid_l, updated_l = finite.tolist(), valid.tolist(), updated.tolist()
        finite_w_l = finite_w.tolist()
        per_client = samples // (len(live) * C)
        init_samples = self._init_samples()
        rows: dict[int, dict[str, Any]] = {}
        for j, i in enumerate(live):
            strategy, ok = self.strategies[i], finite_l[j]
            used = [c for c, good in zip(cids[j], ok) if good]
            strategy.trained.update(used)
            rejected = C - valid_l[j]
            row: dict[str, Any] = {"round": server_round, "clients": cids[j],
                                   "replies": valid_l[j], **round_outcome(["rejected"] * rejected, 0),
                                   "updated": bool(updated_l[j] and finite_w_l[j])}
            if updated_l[j] and not finite_w_l[j]:
                row["diverged"] = ("the aggregated update is not finite (the model would hold NaN "
                                   "or infinite values)")
            if rejected:
                strategy.last_error = "rejected update: it holds NaN or infinite values"
            if used:
                for key in TRAIN_METRICS:
                    if key in losses:
                        vals = [v for v, good in zip(losses[key][j], ok) if good]
                        row[key.replace("-", "_")] = math.fsum(vals) / len(vals)
                drawn = sum(per_client + (init_samples if f else 0)
                            for f, good in zip(fresh[j], ok) if good)
                row["samples"] = drawn
                row["train_seconds_max"] = seconds
                self.totals[i]["samples"] += drawn
            self.totals[i]["bytes_down"] += self.bytes_down * C
            self.totals[i]["bytes_up"] += self.bytes_up * C
            rows[i] = row
        return rows

    def _evaluate_and_log(self, server_round: int, rows: dict[int, dict[str, Any]],
                          start: float) -> None:
        """Evaluate the runs due, then log, account and checkpoint every live run's row."""
        stop = checkpoint.stop_requested()
        ended: list[tuple[int, RunStopped]] = []
        for j, i in enumerate(list(self.live)):
            strategy, row = self.strategies[i], rows[i]
            if strategy.is_eval_round(server_round):
                row["eval"] = self._evaluate(j, i, server_round)
            resets = {k: v for k, v in strategy.round_stats.items() if k.startswith("memory_reset")}
            row.update(resets)
            strategy.round_stats = {}
            row.update(self.totals[i], seconds=time.perf_counter() - start)
            self.states[i]["seconds"] = row["seconds"]
            self.recorders[i].log_round(row)
            self.trackers[i].log_round(row)
            try:
                self.healths[i].observe(row, strategy.last_error)
            except RunStopped as e:
                ended.append((i, e))
                continue
            note_evaluation(self.states[i], row)
            every = self.cfgs[i].federated.checkpoint_every
            if server_round < self.rounds and (stop or (every and server_round > 0
                                                        and server_round % every == 0)):
                self._save_checkpoint(j, i, server_round)
        for i, e in ended:
            self._finish(i, e.status, e.message, distrust_w=e.distrust_w)
        if stop and server_round < self.rounds:
            for i in list(self.live):
                self._finish(i, "interrupted", f"interrupted after round {server_round}; resume "
                             "with: fedmaml sweep (the same command)")
            self.live = []

    def _evaluate(self, j: int, i: int, server_round: int) -> dict[str, Any]:
        """Run ``i``'s evaluation panel, client by client, summarised by its strategy."""
        strategy, setup = self.strategies[i], self.setups[i]
        w = {k: v[j] for k, v in self.w.items()}
        cids = strategy.eval_clients(server_round)
        outcomes: list[tuple[Any, str | None]] = []
        for cid in cids:
            try:
                store = _DenseStore(self, i, cid) if cid < self.has_memory.shape[1] else _NoStore()
                outcomes.append((evaluate_client(setup, cid, w, store), None))
            except Exception as e:  # noqa: BLE001 - the client fails, the panel goes on
                outcomes.append((None, f"evaluation error: client {cid}: {type(e).__name__}: {e}"))
        return dict(strategy.evaluation_metrics(server_round, cids, outcomes))

    # -- pieces -----------------------------------------------------------------------------------
    def _client_tasks(self, i: int, cid: int) -> list[Task]:
        tasks = self._tasks[i].get(cid)
        if tasks is None:
            tasks = self._tasks[i][cid] = self.setups[i].federation.client_tasks(cid)
        return tasks

    def _num_examples(self, i: int, cid: int) -> int:
        return sum(t.num_examples for t in self._client_tasks(i, cid))

    def _fresh(self, cids: list[list[int]]) -> np.ndarray:
        """Per (run, client), flattened: does the client (re)initialise its memory this round?"""
        if not self.algorithm.uses_memory:
            return np.zeros(sum(len(c) for c in cids), dtype=bool)
        if self.setups[self.live[0]].hyper.memory_policy == "reinit":
            return np.ones(sum(len(c) for c in cids), dtype=bool)
        return np.concatenate([~self.has_memory[i, c] for i, c in zip(self.live, cids)])

    def _initialise(self, at: np.ndarray, tasks: list[list[Task]], keys: np.ndarray, hp: Hyper,
                    rows_at: torch.Tensor, cols: torch.Tensor) -> None:
        """First memories of the clients at flat positions ``at``: ``A(w; S_0)`` from their run's
        ``w_r`` (or initial model, ``memory_init: initial_model``), as ``client_update`` makes them."""
        init = draw_init([tasks[a] for a in at], hp, keys[at])
        pick = torch.from_numpy(at)
        runs = rows_at[pick]
        source = self.initial if hp.memory_init == "initial_model" else self.w
        if source is self.initial:
            live = torch.tensor(self.live)
            start = {k: v[live[runs]] for k, v in source.items()}
        else:
            start = {k: v[runs] for k, v in source.items()}
        alpha = self.values["alpha"][runs]
        model, loss_fn = self.model, self.loss_fn

        def one(w_, x, y, a):
            step = dataclasses.replace(hp.step, alpha=a)
            return initial_memory(model, loss_fn, dataclasses.replace(hp, step=step), w_, (x, y))

        memory = torch.func.vmap(one)(start, init[0], init[1], alpha)
        live_runs = torch.tensor(self.live)[runs]
        for k, v in memory.items():
            self.memory[k][live_runs, cols[pick]] = v
        self.has_memory[live_runs.numpy(), cols[pick].numpy()] = True

    def _init_samples(self) -> int:
        hp = self.setups[self.live[0]].hyper
        return self.cfgs[self.live[0]].data.tasks_per_client * hp.init_support_size

    # -- ending, checkpoints ----------------------------------------------------------------------
    def _finish(self, i: int, status: str, message: str, distrust_w: bool = False) -> None:
        """End run ``i``: its summary, model.pt (the last good model), figure and trackers; it
        leaves the batch."""
        j = self.live.index(i)
        cfg, strategy = self.cfgs[i], self.strategies[i]
        if status != "completed":
            (log.warning if status == "interrupted" else log.error)("%s: %s", cfg.name, message)
        summary = run_summary(cfg, strategy, self.healths[i], self.states[i], status, message)
        summary["batch"] = {"runs": len(self.cfgs), "engine": "fedmaml sweep --vectorize"}
        model = _row(self.w_before if distrust_w else self.w, j)
        self.recorders[i].finish(summary, model)
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

    def _save_checkpoint(self, j: int, i: int, server_round: int) -> None:
        """Run ``i``'s checkpoint, in the format a run alone writes (memories as a memory bank)."""
        strategy = self.strategies[i]
        self._sync_strategy(j, i)
        checkpoint.save(self.dirs[i], {
            "round": server_round, "seconds": self.states[i]["seconds"],
            "rng": checkpoint.rng_state(), "strategy": strategy.checkpoint_state(),
            "memories": {"bank": self._bank_state(i)}, "health": self.healths[i].state(),
            "app": self.states[i], "metrics": self.recorders[i].text()})

    def _sync_strategy(self, j: int, i: int) -> None:
        s = self.strategies[i]
        s.w, s.w_before_update = _row(self.w, j), _row(self.w_before, j)
        s.optimizer.state = {k: v[j].clone() for k, v in self.optimizer.state.items()}
        s.optimizer.steps = int(self.optimizer.steps[j])
        s.totals = dict(self.totals[i])

    def _bank_state(self, i: int) -> dict[str, Any]:
        from fedmaml.engines.memory_bank import CHECKPOINT_FORMAT

        n = self.has_memory.shape[1]
        ids = np.flatnonzero(self.has_memory[i]) if self.memory else np.zeros(0, dtype=np.int64)
        index = torch.from_numpy(ids.astype(np.int64))
        return {"format": CHECKPOINT_FORMAT, "num_clients": n, "client_ids": index,
                "memory": {k: v[i].index_select(0, index).clone() for k, v in self.memory.items()}}

    def _restore(self, saved: list[dict[str, Any]]) -> None:
        """Every run's state from its checkpoint (as ``run_federated`` resumes a run)."""
        for i, s in enumerate(saved):
            strategy = self.strategies[i]
            strategy.restore_state(s["strategy"])
            self.healths[i].restore(s["health"])
            self.states[i] = s["app"]
            self.totals[i] = dict(strategy.totals)
            bank = s["memories"].get("bank")
            if self.memory:
                if bank is None:
                    raise ValueError(f"{self.dirs[i]}: the checkpoint holds no memory bank (it was "
                                     "written by another engine); resume it alone")
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


class _NoStore:
    def load(self) -> None:
        return None


def _value(hp: Hyper, name: str) -> float:
    return float(hp.eta if name == "eta" else getattr(hp.step, name))


def _unflatten(x: Any, runs: int, clients: int) -> Any:
    """``[R * C, ...]`` -> ``[R, C, ...]`` (a batch pair too; ``None`` stays)."""
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(_unflatten(t, runs, clients) for t in x)
    return x.reshape(runs, clients, *x.shape[1:])


def _samples(data: RoundData, clients: int) -> int:
    """Examples a round's step data holds over ``clients`` clients (the init batch apart)."""
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
              resume: bool = False) -> dict[int, dict[str, Any]]:
    """Train ``configs`` as one :class:`RunBatch`; return each run's summary by index."""
    return RunBatch(configs, run_dirs, quiet=quiet, resume=resume).run()
