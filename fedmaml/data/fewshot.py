"""Turn one client's examples into its tasks: task split, N-way relabelling, held-out split.

Works on index arrays only (the tensors stay in the pool), so planning a whole federation is cheap
and every problem (a client too small, too few classes for ``n_way``) is reported when the
federation is built, not rounds later when that client is first sampled.

* ``n_way = 0``: the client's examples are cut into ``tasks_per_client`` random chunks, global labels.
* ``n_way = N``: each task gets ``N`` of the client's classes (the classes are dealt to tasks like
  :func:`~fedmaml.data.partition.class_partition` deals them to clients) and relabels them
  ``0..N-1`` in a random, fixed order (so a model cannot rely on global class order). Client classes
  past ``tasks_per_client * N`` go unused.

Each task's examples are then split into a training pool and a held-out set, stratified by class,
and the training pool is ordered round-robin over classes, because evaluation adapts on its first
``eval_adapt_size`` examples: that prefix then covers the classes evenly, like an N-way K-shot
support set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmaml.errors import DataError

from .partition import class_partition


@dataclass(frozen=True)
class TaskPlan:
    """The pool indices of one task.

    ``classes`` is None for global labels; for an N-way task, ``classes[i]`` is the global class
    relabelled as ``i``.
    """

    train: np.ndarray
    heldout: np.ndarray
    classes: np.ndarray | None = None


def plan_client_tasks(
    indices: np.ndarray,
    labels: np.ndarray,
    *,
    tasks: int,
    n_way: int,
    heldout_fraction: float,
    rng: np.random.Generator,
) -> list[TaskPlan]:
    """Plan ``tasks`` tasks over a client's pool ``indices`` (``labels`` are the whole pool's)."""
    indices = np.asarray(indices)
    local = np.asarray(labels)[indices]
    if n_way == 0:
        if len(indices) < 2 * tasks:
            raise DataError(
                f"it holds {len(indices)} examples; {tasks} task(s) need at least {2 * tasks} "
                f"(one training and one held-out example each)"
            )
        groups = np.array_split(rng.permutation(len(indices)), tasks)
    else:
        held = len(np.unique(local))
        if held < n_way:
            raise DataError(
                f"it holds {held} classes but data.n_way = {n_way} needs at least {n_way} per task; "
                f"use data.partition = 'classes' with data.classes_per_client >= n_way, a larger "
                f"data.dirichlet_alpha, or a smaller n_way"
            )
        groups = class_partition(local, tasks, n_way, rng)
    plans = []
    for group in groups:
        train, heldout = stratified_split(local[group], heldout_fraction, rng)
        classes = rng.permutation(np.unique(local[group])) if n_way else None
        plans.append(TaskPlan(indices[group[train]], indices[group[heldout]], classes))
    return plans


def stratified_split(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of a training pool and a held-out set (``round(fraction * n)``, at least 1).

    Held-out examples are taken at evenly spaced positions (random offset) of the examples sorted by
    class, so each class contributes about ``fraction`` of its examples; with ``fraction < 0.5`` only a
    class with a single example can end up with no training example. The training pool comes back
    in round-robin class order (:func:`round_robin`).
    """
    labels = np.asarray(labels)
    n = len(labels)
    if n < 2:
        raise DataError(f"a task needs at least 2 examples (1 training, 1 held-out); it has {n}")
    h = min(max(round(fraction * n), 1), n - 1)
    shuffled = rng.permutation(n)
    by_class = shuffled[np.argsort(labels[shuffled], kind="stable")]
    picks = np.floor((np.arange(h) + rng.random()) * (n / h)).astype(np.int64)
    is_heldout = np.zeros(n, dtype=bool)
    is_heldout[picks] = True
    heldout = by_class[is_heldout]
    train = round_robin(by_class[~is_heldout], labels, rng)
    return train, heldout


def round_robin(positions: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Order ``positions`` as one example of each class, then a second of each, and so on.

    Classes appear in a random order within each round, examples in a random order within a class.
    """
    positions = rng.permutation(positions)
    ranks = _rank_within_class(np.asarray(labels)[positions])
    return positions[np.argsort(ranks, kind="stable")]


def _rank_within_class(labels: np.ndarray) -> np.ndarray:
    """For each element, how many elements of the same class come before it."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    run_lengths = np.diff(np.r_[starts, len(labels)])
    ranks = np.empty(len(labels), dtype=np.int64)
    ranks[order] = np.arange(len(labels)) - np.repeat(starts, run_lengths)
    return ranks
