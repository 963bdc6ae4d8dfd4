"""What every algorithm shares: static hyperparameters, a client's pre-drawn round data, and the
client update that turns ``w_r`` into ``delta = w - w_r`` (step 2 of
docs/algorithms.md#federated-localmoml).

A round's data is drawn *before* the update (``draw_round``, or ``draw_cohort`` for many clients at
once, both from counter-based streams keyed by ``(seed, client id, round)``), so the update itself is a pure
function of tensors: the same code runs per client (Flower ``ClientApp``) or vmapped over a cohort.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from fedmaml.core.losses import LossFn
from fedmaml.core.memory import init_memory
from fedmaml.core.params import Params, stack, sub
from fedmaml.core.task_step import Batch, StepConfig
from fedmaml.data.counter import Stream
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


class Algorithm:
    """A federated (meta-)learning algorithm: a client update and a server rule (docs/custom.md,
    "Your own algorithm"). The built-in algorithms are instances of subclasses; so is yours.

    Client side, :meth:`local_round` turns the round's global model ``w_r`` into the client's model
    ``w`` (the update sent is ``w - w_r``, :func:`client_update`), its new memory and metrics. It
    must be a pure function of tensors so that every engine gives the same numbers and the
    vectorized engine can ``torch.func.vmap`` it over a cohort: do not change its inputs in place,
    do not call ``.item()``/``float()`` on tensors and do not branch in Python on their values
    (``torch.where`` does). Its hyperparameters are attributes set by ``__init__`` (the
    ``algorithm.kwargs`` of the config), plus the shared ones of :class:`Hyper`.

    Memory (``uses_memory = True``): per task of the client, a dict of parameter-shaped tensors
    stacked along a task axis (``[tasks, ...]``); :meth:`initial_memory` makes it at a client's
    first participation (and at every one with ``memory_policy: reinit``). The client keeps it
    between rounds (``Context.state``, the memory bank, or files on a device) and evaluation also
    starts from it (``memory-*`` metrics, ``evaluation.from_memory``).

    Server side, :meth:`server_update` turns the stacked updates into the direction the server
    optimizer steps along; the default is the weighted (or uniform, ``federated.aggregation``) mean.
    """

    #: Its name in logs and tables; ``algorithm.name`` is what the config records.
    name: str = "algorithm"
    #: Whether clients keep a memory between rounds (MOML's ``u_i``, Ditto's personal models).
    uses_memory: bool = False

    def needs_extra_batch(self, hp: Hyper) -> bool:
        """Whether a round draws the independent batch ``S'`` (``RoundData.extra``)."""
        return False

    def local_round(self, model: StagedModel, loss_fn: LossFn, hp: Hyper, w: Params,
                    memory: Params | None, data: RoundData
                    ) -> tuple[Params, Params | None, dict[str, Tensor]]:
        """``(w_r, memory, data) -> (w, memory', metrics)``: the client's model after its ``H``
        local steps (``data`` has leading axes ``[H, B]``), its new memory (``None`` without) and
        scalar tensor metrics (``loss_after``, optionally ``loss_before``: query losses)."""
        raise NotImplementedError(f"{type(self).__name__} must define local_round")

    def initial_memory(self, model: StagedModel, loss_fn: LossFn, hp: Hyper, w: Params,
                       init: Batch) -> Params:
        """A client's first memory from ``w`` (the round's model, or the initial model with
        ``memory_init: initial_model``) and ``init`` (``K0`` examples of each of its tasks,
        ``[tasks, K0, ...]``); MOML's default: ``u_i = A_i(w; S_0)`` per task."""
        return initial_memory(model, loss_fn, hp, w, init)

    def server_update(self, stacked: Params, weights: Tensor) -> Params:
        """The direction the server optimizer steps along, from the clients' updates stacked along
        a leading axis (``[n, ...]``, in client-id order) and their weights (``[n]`` float64:
        example counts, or ones with ``federated.aggregation: uniform``). Override it for another
        rule (a robust mean, a server-side correction); the default is not called: the server
        takes its weighted mean as every built-in algorithm does (with differential privacy's
        clipping and noise when configured)."""
        raise NotImplementedError  # pragma: no cover - the default rule is the built-in mean


def has_server_rule(algorithm: Algorithm) -> bool:
    """Whether ``algorithm`` replaces the built-in mean of updates with its own server rule."""
    return type(algorithm).server_update is not Algorithm.server_update


#: Purposes of a client's round stream (the first word mixed after its key).
_TASKS, _STEP, _INIT = 0, 1, 2


def draw_cohort(clients: Sequence[Sequence[Task]], hp: Hyper, keys: np.ndarray, *, extra: bool,
                init: bool) -> RoundData:
    """Draw the round of ``C`` clients at once, stacked along a leading client axis ``[C, ...]``.

    Client ``c`` holds ``clients[c]`` (every client the same number of tasks, of one class) and
    draws from its round key ``keys[c]`` (:func:`fedmaml.data.counter.round_keys`): per step ``B``
    distinct tasks and disjoint support/query(/extra) batches, and with ``init`` ``K0`` examples of
    every task. Every number is a counter-based hash of the client's key and its position, so a
    client's data is the same alone (:func:`draw_round`) as in any cohort."""
    C, n, H = len(clients), len(clients[0]), hp.local_steps
    if any(len(tasks) != n for tasks in clients):
        raise ValueError("a cohort's clients must hold the same number of tasks")
    B = min(hp.tasks_per_step, n)
    steps = np.arange(H)
    # Streams per (client, step[, slot]): the client's key mixed with the purpose and the position.
    client = Stream(np.asarray(keys, dtype=np.uint64).reshape(C, 1))
    if n == 1:  # one task (cross-device clients): the only permutation, no numbers needed
        index = torch.zeros((C, H, 1), dtype=torch.int64)
    else:
        order = client.child(_TASKS, steps)  # [C, H]
        index = order.first_of_permutation(n, B, n)  # [C, H, B]
    k, q = hp.support_size, hp.query_size
    picks = index.tolist()
    slot_tasks = [clients[c][i] for c in range(C) for row in picks[c] for i in row]
    slots = client.expand().child(_STEP, steps.reshape(H, 1), np.arange(B))  # [C, H, B]
    x, y = _draw(slot_tasks, slots.flat(), k + q + (k if extra else 0))  # [C * H * B, m, ...]

    def part(start: int, stop: int) -> Batch:
        return (x[:, start:stop].reshape(C, H, B, stop - start, *x.shape[2:]),
                y[:, start:stop].reshape(C, H, B, stop - start, *y.shape[2:]))

    return RoundData(index, part(0, k), part(k, k + q), part(k + q, 2 * k + q) if extra else None,
                     draw_init(clients, hp, keys) if init else None)


def draw_init(clients: Sequence[Sequence[Task]], hp: Hyper, keys: np.ndarray) -> Batch:
    """The memory (re)initialisation data of ``C`` clients (``[C, tasks, K0, ...]``): ``K0``
    examples of every task from each client's round key, as :func:`draw_cohort` draws them."""
    C, n = len(clients), len(clients[0])
    client = Stream(np.asarray(keys, dtype=np.uint64).reshape(C, 1))
    tasks = [t for ts in clients for t in ts]
    slots = client.child(_INIT, np.arange(n))
    xi, yi = _draw(tasks, slots.flat(), hp.init_support_size)
    return xi.reshape(C, n, *xi.shape[1:]), yi.reshape(C, n, *yi.shape[1:])


def _draw(tasks: list[Task], streams: Stream, n: int) -> tuple[Tensor, Tensor]:
    """``Task.draw_slots`` for slots whose tasks may be of several classes (grouped by class)."""
    kinds = {type(t) for t in tasks}
    if len(kinds) == 1:
        return type(tasks[0]).draw_slots(tasks, streams, n)
    x = y = None
    for kind in kinds:
        rows = [j for j, t in enumerate(tasks) if type(t) is kind]
        xk, yk = kind.draw_slots([tasks[j] for j in rows], streams.select(rows), n)
        if x is None:
            x = xk.new_empty((len(tasks), *xk.shape[1:]))
            y = yk.new_empty((len(tasks), *yk.shape[1:]))
        x[torch.tensor(rows)], y[torch.tensor(rows)] = xk, yk
    return x, y


def draw_round(tasks: Sequence[Task], hp: Hyper, key: np.ndarray | np.uint64, *, extra: bool,
               init: bool) -> RoundData:
    """One client's round (``key``: its round key): :func:`draw_cohort` for a cohort of one."""
    data = draw_cohort([tasks], hp, np.asarray(key, dtype=np.uint64).reshape(1), extra=extra,
                       init=init)
    one = lambda b: None if b is None else (b[0][0], b[1][0])  # noqa: E731
    return RoundData(data.task_index[0], one(data.support), one(data.query), one(data.extra),
                     one(data.init))


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
        memory = algorithm.initial_memory(model, loss_fn, hp, start, data.init)
    w_new, memory, metrics = algorithm.local_round(model, loss_fn, hp, w, memory, data)
    return sub(w_new, w), memory, metrics


def step_batches(data: RoundData, h: int, b: int) -> tuple[Batch, Batch, Batch | None]:
    """The support, query and extra batches of slot ``(h, b)``."""
    pick = lambda batch: None if batch is None else (batch[0][h, b], batch[1][h, b])  # noqa: E731
    return pick(data.support), pick(data.query), pick(data.extra)


def mean_metrics(per_task: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([m[k] for m in per_task]).mean() for k in per_task[0]}
