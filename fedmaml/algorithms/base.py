"""What every algorithm shares: static hyperparameters, a client's pre-drawn round data, and the
client update that turns ``w_r`` into ``delta = w - w_r`` (ALGORITHMS.md §5 step 2).

A round's data is drawn *before* the update (``draw_round``), so the update itself is a pure
function of tensors: the same code runs per client (Flower ``ClientApp``) or vmapped over a cohort.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import Tensor

from fedmaml.core.losses import LossFn
from fedmaml.core.memory import init_memory
from fedmaml.core.params import Params, stack, sub
from fedmaml.core.task_step import Batch, StepConfig
from fedmaml.data.tasks import Task
from fedmaml.models.base import StagedModel


@dataclass(frozen=True)
class Hyper:
    """Static hyperparameters of a client update (hashable: cohorts group by it)."""

    step: StepConfig
    eta: float
    local_steps: int = 1  # H
    tasks_per_step: int = 1  # B (within a silo)
    support_size: int = 5  # K
    query_size: int = 5
    init_support_size: int = 5  # K0
    memory_policy: str = "keep"  # keep | reinit | decay_to_w
    memory_init: str = "current_model"  # first memory from w_r, or from the initial model w_0

    def with_eta(self, eta: float) -> "Hyper":
        return dataclasses.replace(self, eta=eta)


@dataclass(frozen=True)
class RoundData:
    """One client's data for one round, drawn up front. Leading axes ``[H, B]`` (steps, tasks)."""

    task_index: Tensor  # [H, B] int64: which of the client's tasks each slot uses
    support: Batch  # x [H, B, K, ...], y [H, B, K, ...]
    query: Batch
    extra: Batch | None = None  # independent batch S' for the Hessian-free estimator
    init: Batch | None = None  # [n_tasks, K0, ...]: data for memory (re)initialisation

    def to(self, device: torch.device | str) -> "RoundData":
        move = lambda b: None if b is None else (b[0].to(device), b[1].to(device))  # noqa: E731
        return RoundData(self.task_index.to(device), move(self.support), move(self.query),
                         move(self.extra), move(self.init))


class Algorithm(Protocol):
    """A federated (meta-)learning algorithm: a local round on the client; averaging on the server."""

    name: str
    uses_memory: bool

    def needs_extra_batch(self, hp: Hyper) -> bool: ...

    def local_round(self, model: StagedModel, loss_fn: LossFn, hp: Hyper, w: Params,
                    memory: Params | None, data: RoundData
                    ) -> tuple[Params, Params | None, dict[str, Tensor]]: ...


def draw_round(tasks: Sequence[Task], hp: Hyper, generator: torch.Generator, *,
               extra: bool, init: bool) -> RoundData:
    """Draw a client's round: per step, ``B`` distinct tasks and disjoint support/query batches."""
    n, H = len(tasks), hp.local_steps
    B = min(hp.tasks_per_step, n)
    index = torch.stack([torch.randperm(n, generator=generator)[:B] for _ in range(H)])
    k, q = hp.support_size, hp.query_size
    xs, ys, xq, yq, xe, ye = [], [], [], [], [], []
    for i in index.flatten().tolist():
        x, y = tasks[i].draw(generator, k + q + (k if extra else 0))
        xs.append(x[:k]); ys.append(y[:k])
        xq.append(x[k:k + q]); yq.append(y[k:k + q])
        xe.append(x[k + q:]); ye.append(y[k + q:])

    def shaped(parts: list[Tensor]) -> Tensor:
        t = torch.stack(parts)
        return t.reshape(H, B, *t.shape[1:])

    init_batch = None
    if init:
        drawn = [t.draw(generator, hp.init_support_size) for t in tasks]
        init_batch = (torch.stack([d[0] for d in drawn]), torch.stack([d[1] for d in drawn]))
    return RoundData(index, (shaped(xs), shaped(ys)), (shaped(xq), shaped(yq)),
                     (shaped(xe), shaped(ye)) if extra else None, init_batch)


def initial_memory(model: StagedModel, loss_fn: LossFn, hp: Hyper, w: Params,
                   init: Batch) -> Params:
    """Memories of all of a client's tasks, ``u_i = A_i(w; S_0)``, stacked along a task axis."""
    return stack([init_memory(model, loss_fn, w, x, y, hp.step.memory_pattern, hp.step.alpha)
                  for x, y in zip(init[0], init[1])])


def client_update(algorithm: Algorithm, model: StagedModel, loss_fn: LossFn, hp: Hyper,
                  w: Params, memory: Params | None, data: RoundData,
                  initial: Params | None = None
                  ) -> tuple[Params, Params | None, dict[str, Tensor]]:
    """``w_r -> (delta, memory', metrics)``; (re)initialises memory when ``data.init`` is given,
    from ``w_r`` or, with ``memory_init: initial_model``, from the initial meta-model ``initial``."""
    if algorithm.uses_memory and data.init is not None:
        if hp.memory_init == "initial_model" and initial is None:
            raise ValueError("memory_init 'initial_model' needs the initial meta-model (initial=)")
        start = initial if hp.memory_init == "initial_model" else w
        memory = initial_memory(model, loss_fn, hp, start, data.init)
    w_new, memory, metrics = algorithm.local_round(model, loss_fn, hp, w, memory, data)
    return sub(w_new, w), memory, metrics


def step_batches(data: RoundData, h: int, b: int) -> tuple[Batch, Batch, Batch | None]:
    """The support, query and extra batches of slot ``(h, b)``."""
    pick = lambda batch: None if batch is None else (batch[0][h, b], batch[1][h, b])  # noqa: E731
    return pick(data.support), pick(data.query), pick(data.extra)


def mean_metrics(per_task: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([m[k] for m in per_task]).mean() for k in per_task[0]}
