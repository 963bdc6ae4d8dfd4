"""Federations over a finite labelled pool (digits, MNIST-1D, Omniglot, FEMNIST).

The pool (all examples of the data set) is partitioned across ``num_clients + unseen_clients``
clients: the first ``num_clients`` parts train, the rest are the unseen clients, so unseen clients
never share an example with training clients. Every part is planned into tasks at build time (index
arrays only, see :mod:`fedmaml.data.fewshot`); the tensors of a client's tasks are sliced from the
pool when the client is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import Tensor

from fedmaml.errors import DataError

from .fewshot import TaskPlan, plan_client_tasks
from .partition import class_partition, dirichlet_partition, iid_partition, natural_partition
from .seeding import numpy_rng
from .spec import DataSpec
from .tasks import Federation, PoolTask, Task


@dataclass(frozen=True)
class LabelledPool:
    """All examples of a classification data set.

    ``x`` float32 ``[n, *input_shape]``; ``y`` int64 ``[n]`` in ``0..num_classes-1``. ``groups`` are
    the natural clients (e.g. FEMNIST writers) as index arrays, named by ``group_names``.
    """

    x: Tensor
    y: Tensor
    num_classes: int
    groups: tuple[np.ndarray, ...] | None = None
    group_names: tuple[str, ...] | None = None

    @classmethod
    def from_arrays(cls, x: np.ndarray, y: np.ndarray, num_classes: int, **kw) -> "LabelledPool":
        """Wrap numpy arrays without copying them."""
        x_t = torch.from_numpy(np.asarray(x, np.float32))
        return cls(x_t, torch.from_numpy(np.asarray(y, np.int64)), num_classes, **kw)


def build_pool_federation(pool: LabelledPool, spec: DataSpec, seed: int) -> Federation:
    """Partition ``pool`` by ``spec.partition`` and plan every client's tasks."""
    num_parts = spec.num_clients + spec.unseen_clients
    labels = pool.y.numpy()
    parts, names = _partition(pool, labels, num_parts, spec, numpy_rng(seed, "pool/partition"))
    plans = []
    for i, part in enumerate(parts):
        try:
            plans.append(
                plan_client_tasks(
                    part,
                    labels,
                    tasks=spec.tasks_per_client,
                    n_way=spec.n_way,
                    heldout_fraction=spec.heldout_fraction,
                    rng=numpy_rng(seed, "pool/plan", i),
                )
            )
        except DataError as exc:
            who = f"client {i}" if i < spec.num_clients else f"unseen client {i - spec.num_clients}"
            if names is not None:
                who += f" (writer {names[i]!r})"
            raise DataError(f"data.family = {spec.family!r}, {who}: {exc}") from exc
    return Federation(
        num_clients=spec.num_clients,
        num_unseen=spec.unseen_clients,
        input_shape=tuple(pool.x.shape[1:]),
        num_outputs=spec.n_way or pool.num_classes,
        task_type="classification",
        _client_tasks=partial(_tasks, pool, tuple(plans[: spec.num_clients]), spec.eval_adapt_size),
        _unseen_tasks=partial(_tasks, pool, tuple(plans[spec.num_clients :]), spec.eval_adapt_size),
    )


def _partition(
    pool: LabelledPool, labels: np.ndarray, num_parts: int, spec: DataSpec, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[str] | None]:
    min_size = 2 * spec.tasks_per_client
    parameter = {
        "dirichlet": f" (data.dirichlet_alpha = {spec.dirichlet_alpha})",
        "classes": f" (data.classes_per_client = {spec.classes_per_client})",
    }.get(spec.partition, "")
    setting = (
        f"data.family = {spec.family!r}, data.partition = {spec.partition!r}{parameter} over "
        f"{spec.num_clients} + {spec.unseen_clients} unseen clients"
    )
    try:
        if spec.partition == "iid":
            return iid_partition(len(labels), num_parts, rng, min_size), None
        if spec.partition == "dirichlet":
            return dirichlet_partition(labels, num_parts, spec.dirichlet_alpha, rng, min_size), None
        if spec.partition == "classes":
            return class_partition(labels, num_parts, spec.classes_per_client, rng), None
        if pool.groups is None:  # spec validation already limits 'natural' to natural families
            raise DataError("this data set has no natural clients")
        parts, chosen = natural_partition(pool.groups, num_parts, rng, min_size)
        names = [pool.group_names[g] if pool.group_names else str(g) for g in chosen]
        return parts, names
    except DataError as exc:
        raise DataError(f"{setting}: {exc}") from exc


def _tasks(pool: LabelledPool, plans: tuple[list[TaskPlan], ...], adapt: int, i: int) -> list[Task]:
    return [make_pool_task(pool, plan, adapt) for plan in plans[i]]


def make_pool_task(pool: LabelledPool, plan: TaskPlan, adapt_size: int) -> PoolTask:
    """Slice one planned task out of the pool (relabelling an N-way task to 0..N-1)."""
    train, heldout = torch.from_numpy(plan.train), torch.from_numpy(plan.heldout)
    train_y, heldout_y = pool.y[train], pool.y[heldout]
    if plan.classes is not None:
        relabel = torch.full((pool.num_classes,), -1, dtype=torch.int64)
        relabel[torch.from_numpy(plan.classes)] = torch.arange(len(plan.classes))
        train_y, heldout_y = relabel[train_y], relabel[heldout_y]
    return PoolTask(pool.x[train], train_y, pool.x[heldout], heldout_y, adapt_size=adapt_size)
