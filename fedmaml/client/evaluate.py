"""A client's evaluation, transport-free: personalized metrics from ``w`` and from its memory, and
the memory's diagnostics. A batch of runs (fedmaml/engines/batch_evaluation.py) computes the
per-task values vmapped and assembles each client's metrics with the same functions."""

from __future__ import annotations

import time
from typing import Any

from fedmaml.algorithms import Hyper
from fedmaml.core.diagnostics import tracking_error
from fedmaml.core.evaluation import personalized_metrics
from fedmaml.core.params import Params
from fedmaml.core.patterns import Pattern
from fedmaml.data.tasks import Task
from fedmaml.client.metrics import MEMORY_RESET, NUM_EXAMPLES, PARTITION
from fedmaml.client.setup import ClientSetup
from fedmaml.client.store import MemoryStore, was_reset


def evaluation_tasks(setup: ClientSetup, cid: int) -> list[Task]:
    """Client ``cid``'s tasks: a training client's, or (ids from ``num_clients``) an unseen one's."""
    fed = setup.federation
    return (fed.unseen_tasks(cid - fed.num_clients) if cid >= fed.num_clients
            else fed.client_tasks(cid))


def add_task_metrics(sums: dict[str, float], prefix: str, metrics: dict[str, Any],
                     tasks: int) -> None:
    """Add one task's metrics (from one starting point, ``prefix``) to its client's means."""
    for k, v in metrics.items():
        sums[prefix + k] = sums.get(prefix + k, 0.0) + float(v) / tasks


def tracking_alpha(hp: Hyper, tasks: int) -> float:
    """The step of the adaptation a memory update averages (``memory_tracking_error``): the memory
    step, times ``n_tasks / B`` under ``decay_to_w`` (the unbiased step of the sampled tasks')."""
    alpha = hp.step.memory_alpha
    if hp.memory_policy == "decay_to_w":
        alpha *= tasks / min(hp.tasks_per_step, tasks)
    return alpha


def client_evaluation(sums: dict[str, float], adapt_ms: float, tracking: float | None,
                      examples: int, cid: int, unseen: bool) -> dict[str, float]:
    """A client's evaluation metrics from its per-task means ``sums`` (memory metrics included),
    in the order every engine reports them."""
    out = dict(sums)
    out["adapt-ms"] = adapt_ms
    if "memory-loss" in out:
        out["memory-gap"] = out["memory-loss"] - out["loss"]
        if tracking is not None:
            out["tracking-error"] = tracking
    out[NUM_EXAMPLES] = examples
    out[PARTITION] = cid
    out["unseen"] = int(unseen)
    return out


def evaluate_client(setup: ClientSetup, cid: int, w: Params, store: MemoryStore,
                    pattern: Pattern | None = None) -> dict[str, float]:
    """Personalized metrics of one client, from ``w`` and (if it has one) from its memory, adapting
    with ``pattern`` (default: the config's evaluation pattern)."""
    pattern = setup.eval_pattern if pattern is None else pattern
    unseen = cid >= setup.federation.num_clients
    tasks = evaluation_tasks(setup, cid)
    from_memory = setup.algorithm.uses_memory and setup.config.evaluation.from_memory
    memory = store.load() if from_memory and not unseen else None
    sums: dict[str, float] = {}
    if was_reset(store):
        sums[MEMORY_RESET] = 1
    start = time.perf_counter()
    for i, task in enumerate(tasks):
        split = task.evaluation_split()
        starts = {"": w}
        if memory is not None:
            starts["memory-"] = {k: v[i] for k, v in memory.items()}
        for prefix, params in starts.items():
            add_task_metrics(sums, prefix, personalized_metrics(
                setup.model, setup.loss_fn, params, *split, pattern, setup.eval_alpha,
                setup.classification), len(tasks))
    adapt_ms = (time.perf_counter() - start) * 1000 / len(tasks)
    tracking = (memory_tracking_error(setup, tasks, w, memory)
                if memory is not None and setup.config.evaluation.tracking_error else None)
    return client_evaluation(sums, adapt_ms, tracking,
                             sum(len(t.evaluation_split()[2]) for t in tasks), cid, unseen)


def memory_tracking_error(setup: ClientSetup, tasks: list[Task], w: Params, memory: Params
                          ) -> float:
    """``tracking-error``: mean over the client's tasks of ``||u_i - A_i(w)|| / ||A_i(w)||``,
    where ``A_i(w)`` is the adaptation the memory update averages: the algorithm's memory pattern
    (``algorithm.memory_pattern``, else its inner pattern) with step :func:`tracking_alpha`,
    applied to ``w`` on the task's adaptation split (the examples evaluation adapts on). One
    adaptation per task, no meta-gradient."""
    hp = setup.hyper
    alpha = tracking_alpha(hp, len(tasks))
    errors = [float(tracking_error(setup.model, setup.loss_fn, w,
                                   {k: v[i] for k, v in memory.items()},
                                   *task.evaluation_split()[:2], hp.step.memory_pattern, alpha))
              for i, task in enumerate(tasks)]
    return sum(errors) / len(errors)
