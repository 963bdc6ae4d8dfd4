"""Evaluation rounds of a :class:`~fedmaml.engines.run_batch.RunBatch`: every run's panel at once.

A run evaluates a fixed panel (its seen panel and every unseen client, ``MetaStrategy.eval_clients``):
each task of each client adapts from ``w`` (and, for clients with a memory, from the memory) and
is measured held out (``personalized_metrics``). With a hundred runs that is thousands of small
independent adaptations, so they are stacked (every run, client, task and starting point along one
axis) and run through one vmapped ``personalized_metrics``; the per-client metrics are then put
together by the client library's ``client_evaluation``, as its ``evaluate_client`` puts them
together (fedmaml/client/evaluate.py), and summarised by each run's strategy; the memories'
tracking error is computed the same way, with the library's step (``tracking_alpha``). Runs
whose tasks cannot be stacked (splits of different shapes) are evaluated client by client through
``evaluate_client`` itself. Each run adapts with its evaluation pattern: the config's, or the one
its pattern selection chose (``eval_pattern_for``, as its clients read it from an evaluate
instruction); runs are stacked by pattern.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from fedmaml.client.evaluate import (add_task_metrics, client_evaluation, evaluate_client,
                                     evaluation_tasks, tracking_alpha)
from fedmaml.core.diagnostics import tracking_error
from fedmaml.core.evaluation import personalized_metrics
from fedmaml.core.params import Params
from fedmaml.core.patterns import Pattern
from fedmaml.federated.pattern_selection import eval_pattern_for

log = logging.getLogger("fedmaml")


class RunBatchState(Protocol):
    """What an evaluation reads from its batch of runs. ``RunBatch`` (fedmaml/engines/run_batch.py)
    has all of it and hands itself to the evaluator; naming the needs here keeps the evaluator below
    the batch in the import graph (the batch imports the evaluator, not the other way)."""

    cfgs: list[Any]  # each run's Config
    setups: list[Any]  # each run's ExperimentSetup
    strategies: list[Any]  # each run's MetaStrategy (the evaluation's summariser)
    live: list[int]  # indices of the runs still training
    w: Params  # every run's model, stacked along the run axis
    memory: Params  # [runs, clients, tasks, ...]
    has_memory: np.ndarray  # [runs, clients]
    model: Any
    algorithm: Any
    loss_fn: Any

    def sync_staleness(self, i: int) -> None: ...

#: Adaptations vmapped in one call (bounds the activations held at once).
CHUNK = 2048


@dataclass
class _Panel:
    """One run's evaluation panel, its tasks' splits stacked (built once: the panel is fixed)."""

    cids: list[int]
    tasks: list[tuple[int, int, int]]  # (client id, task index, tasks of the client) per row
    splits: tuple[torch.Tensor, ...]  # adapt x, adapt y, held-out x, held-out y: [T, ...]
    examples: dict[int, int]  # client id -> held-out examples (its weight in the summary)


class _Store:
    """A client's memory in the batch (``evaluate_client``'s store)."""

    def __init__(self, batch: RunBatchState, i: int, cid: int) -> None:
        self.batch, self.i, self.cid = batch, i, cid

    def load(self) -> Params | None:
        b = self.batch
        if self.cid >= b.has_memory.shape[1] or not b.has_memory[self.i, self.cid]:
            return None
        return {k: v[self.i, self.cid] for k, v in b.memory.items()}


class BatchEvaluator:
    def __init__(self, batch: RunBatchState) -> None:
        self.batch = batch
        self._panels: dict[int, _Panel | None] = {}  # None: evaluated client by client

    def evaluate(self, server_round: int) -> dict[int, dict[str, Any]]:
        """Every live run's evaluation record (its row's ``eval``), by run index."""
        b = self.batch
        out: dict[int, dict[str, Any]] = {}
        groups: dict[tuple, list[int]] = {}
        for i in b.live:  # runs adapting alike (pattern, kind of task) go through one call
            panel = self._panel(i)
            if panel is None:
                out[i] = self._one_by_one(i, server_round)
                continue
            groups.setdefault((repr(self._pattern(i)), b.setups[i].classification,
                               tuple(t.shape[1:] for t in panel.splits)), []).append(i)
        for runs in groups.values():
            try:
                out.update(self._stacked(runs, server_round))
            except Exception as e:  # noqa: BLE001 - e.g. an op vmap cannot batch
                log.warning("vectorized sweep: the stacked evaluation of %d runs failed (%s: %s);"
                            " evaluating them client by client", len(runs), type(e).__name__, e)
                for i in runs:
                    self._panels[i] = None
                    out[i] = self._one_by_one(i, server_round)
        return out

    def _pattern(self, i: int) -> Pattern:
        """Run ``i``'s evaluation pattern now (its selection's, once it chose one)."""
        return eval_pattern_for(self.batch.strategies[i].selector.evaluate_config(),
                                self.batch.setups[i])

    def _panel(self, i: int) -> _Panel | None:
        if i in self._panels:
            return self._panels[i]
        b = self.batch
        cids = b.strategies[i].eval_clients()
        rows, splits, examples = [], [], {}
        for cid in cids:
            tasks = evaluation_tasks(b.setups[i], cid)
            for t, task in enumerate(tasks):
                rows.append((cid, t, len(tasks)))
                splits.append(task.evaluation_split())
            examples[cid] = sum(len(task.evaluation_split()[2]) for task in tasks)
        try:
            panel: _Panel | None = _Panel(cids, rows, tuple(torch.stack([s[k] for s in splits])
                                                            for k in range(4)), examples)
        except RuntimeError:  # splits of different shapes: client by client
            panel = None
        self._panels[i] = panel
        return panel

    def _one_by_one(self, i: int, server_round: int) -> dict[str, Any]:
        b = self.batch
        strategy, setup = b.strategies[i], b.setups[i]
        j = b.live.index(i)
        w = {k: v[j] for k, v in b.w.items()}
        cids = strategy.eval_clients()
        outcomes: list[tuple[Any, str | None]] = []
        for cid in cids:
            try:
                outcomes.append((evaluate_client(setup, cid, w, _Store(b, i, cid),
                                                 self._pattern(i)), None))
            except Exception as e:  # noqa: BLE001 - the client fails, the panel goes on
                outcomes.append((None, f"evaluation error: client {cid}: {type(e).__name__}: {e}"))
        b.sync_staleness(i)
        return dict(strategy.evaluation_metrics(server_round, cids, outcomes))

    def _stacked(self, runs: list[int], server_round: int) -> dict[int, dict[str, Any]]:
        """Runs ``runs``' panels adapted in vmapped chunks, then summarised per run."""
        b = self.batch
        start = time.perf_counter()
        n = b.has_memory.shape[1]
        # One entry per (run, task row, start): the run's position, the row, memory or not.
        entries: list[tuple[int, int, int, bool]] = []
        for i in runs:
            from_memory = (b.algorithm.uses_memory and b.cfgs[i].evaluation.from_memory)
            for r, (cid, t, _) in enumerate(self._panels[i].tasks):
                entries.append((i, r, t, False))
                if from_memory and cid < n and b.has_memory[i, cid]:
                    entries.append((i, r, t, True))
        position = {i: b.live.index(i) for i in runs}
        losses: dict[str, list[float]] = {}
        for at in range(0, len(entries), CHUNK):
            for k, v in self._adapt(entries[at:at + CHUNK], position).items():
                losses.setdefault(k, []).extend(v.tolist())
        tracked = [e for e, (i, _, _, memory) in enumerate(entries)
                   if memory and b.cfgs[i].evaluation.tracking_error]
        errors: list[float] = []
        for at in range(0, len(tracked), CHUNK):
            errors += self._tracking([entries[e] for e in tracked[at:at + CHUNK]],
                                     position).tolist()
        error_of = dict(zip(tracked, errors))
        per_item_ms = (time.perf_counter() - start) * 1000 / max(len(entries), 1)
        # Per client, as evaluate_client sums: metric / tasks, task by task.
        sums: dict[tuple[int, int], dict[str, float]] = {}
        tracked_sums: dict[tuple[int, int], float] = {}
        items: dict[tuple[int, int], int] = {}
        for e, (i, r, t, memory) in enumerate(entries):
            cid, _, count = self._panels[i].tasks[r]
            client = sums.setdefault((i, cid), {})
            items[(i, cid)] = items.get((i, cid), 0) + 1
            add_task_metrics(client, "memory-" if memory else "",
                             {k: values[e] for k, values in losses.items()}, count)
            if e in error_of:  # the mean over the client's tasks
                tracked_sums[(i, cid)] = tracked_sums.get((i, cid), 0.0) + error_of[e] / count
        out = {}
        for i in runs:
            panel, strategy = self._panels[i], b.strategies[i]
            outcomes: list[tuple[Any, str | None]] = []
            for cid in panel.cids:
                count = next(c for c_, _, c in panel.tasks if c_ == cid)
                outcomes.append((client_evaluation(
                    sums[(i, cid)], per_item_ms * items[(i, cid)] / count,
                    tracked_sums.get((i, cid)), panel.examples[cid], cid, cid >= n), None))
            b.sync_staleness(i)
            out[i] = dict(strategy.evaluation_metrics(server_round, panel.cids, outcomes))
        return out

    def _starts(self, entries: list[tuple[int, int, int, bool]], position: dict[int, int]
                ) -> Params:
        """Each entry's starting point: its run's ``w``, or its client's task memory."""
        b = self.batch
        run_pos = torch.tensor([position[i] for i, _, _, _ in entries])
        starts = {k: v.index_select(0, run_pos) for k, v in b.w.items()}
        memory_rows = [e for e, (_, _, _, memory) in enumerate(entries) if memory]
        if memory_rows:
            at = torch.tensor(memory_rows)
            runs = torch.tensor([entries[e][0] for e in memory_rows])
            cids = torch.tensor([self._panels[entries[e][0]].tasks[entries[e][1]][0]
                                 for e in memory_rows])
            tasks = torch.tensor([entries[e][2] for e in memory_rows])
            for k, v in b.memory.items():
                starts[k] = starts[k].index_copy(0, at, v[runs, cids, tasks])
        return starts

    def _tracking(self, entries: list[tuple[int, int, int, bool]], position: dict[int, int]
                  ) -> torch.Tensor:
        """The tracking error of memory ``entries`` (``memory_tracking_error``) in one vmapped call."""
        b = self.batch
        memories = self._starts(entries, position)
        w = self._starts([(i, r, t, False) for i, r, t, _ in entries], position)
        splits = [torch.stack([self._panels[i].splits[s][r] for i, r, _, _ in entries])
                  for s in range(2)]
        hp = b.setups[entries[0][0]].hyper
        alpha = torch.tensor([tracking_alpha(b.setups[i].hyper, b.cfgs[i].data.tasks_per_client)
                              for i, _, _, _ in entries], dtype=next(iter(w.values())).dtype)
        model, loss_fn, pattern = b.model, b.loss_fn, hp.step.memory_pattern

        def one(w_, u, x, y, a):
            return tracking_error(model, loss_fn, w_, u, x, y, pattern, a)

        return torch.func.vmap(one)(w, memories, *splits, alpha)

    def _adapt(self, entries: list[tuple[int, int, int, bool]], position: dict[int, int]
               ) -> dict[str, torch.Tensor]:
        """``personalized_metrics`` of ``entries`` in one vmapped call."""
        b = self.batch
        first = b.setups[entries[0][0]]
        starts = self._starts(entries, position)
        splits = [torch.stack([self._panels[i].splits[s][r] for i, r, _, _ in entries])
                  for s in range(4)]
        alpha = torch.tensor([b.setups[i].eval_alpha for i, _, _, _ in entries],
                             dtype=next(iter(starts.values())).dtype)
        model, loss_fn = first.model, first.loss_fn
        pattern, classification = self._pattern(entries[0][0]), first.classification

        def one(start, ax, ay, hx, hy, a):
            return personalized_metrics(model, loss_fn, start, ax, ay, hx, hy, pattern, a,
                                        classification)

        return torch.func.vmap(one)(starts, *splits, alpha)
