"""Sinusoid regression tasks ``y = A sin(x + phi)``, generated on demand.

Two families:

* ``sinusoid`` (Finn et al. 2017): every task draws ``A ~ U[0.1, 5]`` and ``phi ~ U[0, pi]`` from
  a counter-based stream keyed by the run seed and its (client id, task index): a million clients
  cost nothing until one is asked for, a cohort's clients are built with a few tensor operations,
  and every process rebuilds the same client.
* ``sinusoid_grid`` (MOML public code, ``sinewave/``): the 25 training tasks are the fixed grid
  ``A in {1..5}`` x ``phi in {pi/5, ..., pi}`` in the public code's order (amplitude-major:
  task ``g`` has ``A = g // 5 + 1``, ``phi = (g % 5 + 1) * pi / 5``); client ``cid`` holds grid tasks
  ``cid * T .. cid * T + T - 1`` for ``T = tasks_per_client``. Unseen (test) task ``q`` draws
  ``A ~ U[1, 5]`` then ``phi ~ U[pi/5, pi]`` from ``numpy.random.RandomState(q)``, exactly as the
  public code's ``sample_amp_pha(..., seed=q)``: test tasks 0-4 are the paper's, and they are the
  same for every run seed (seeds vary training only, as in the public code).

Inputs are ``x ~ U[-5, 5]`` of shape ``[n, 1]`` and targets float32 ``[n, 1]``. ``draw_slots``
returns fresh points from the caller's counter streams (:mod:`fedmaml.data.counter`). The
evaluation split (``adapt_size`` points to adapt on, ``heldout_size`` others to measure on) is fixed
per task by the task's own evaluation seed (``data.eval_points: separate``, the default): the adapt
and measured points are disjoint draws, so the measured MSE is never on points the model adapted
to. ``data.eval_points: shared`` is the public code's protocol instead: ``heldout_size`` points
drawn once with ``numpy.random.seed(2021)`` are the same for every task, a task adapts on the first
``adapt_size`` of them and is measured on all of them.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch
from torch import Tensor

from .counter import Stream, derive_keys
from .seeding import derived_seed
from .spec import DataSpec
from .tasks import Federation, Task

X_RANGE = (-5.0, 5.0)
#: Finn et al.'s task distribution.
AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
#: The MOML grid and its test-task distribution.
GRID_AMPLITUDES = (1, 2, 3, 4, 5)
GRID_PHASES = tuple(k * math.pi / 5 for k in range(1, 6))
GRID_TEST_AMPLITUDE_RANGE = (1.0, 5.0)
GRID_TEST_PHASE_RANGE = (math.pi / 5, math.pi)
#: Grid evaluation points do not depend on the run seed (like the public code's fixed seed 2021),
#: so every run measures the same points; this constant seeds them.
GRID_EVAL_SEED = 2021


class SinusoidTask(Task):
    """One sine wave ``y = amplitude * sin(x + phase)`` with fresh points on every draw."""

    #: Generative tasks have unlimited data. Every sinusoid task reports this same nominal count, so
    #: example-weighted averaging over sinusoid clients is uniform; the value itself means nothing.
    NOMINAL_NUM_EXAMPLES = 1000
    num_examples = NOMINAL_NUM_EXAMPLES

    def __init__(
        self,
        amplitude: float,
        phase: float,
        eval_seed: int = 0,
        adapt_size: int = 10,
        heldout_size: int = 100,
        x_range: tuple[float, float] = X_RANGE,
        shared_points: bool = False,
    ) -> None:
        self.amplitude, self.phase = float(amplitude), float(phase)
        self.eval_seed = int(eval_seed)
        self.adapt_size, self.heldout_size = int(adapt_size), int(heldout_size)
        self.x_range = (float(x_range[0]), float(x_range[1]))
        self.shared_points = bool(shared_points)
        self._evaluation: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def target(self, x: Tensor) -> Tensor:
        """The noiseless function value at ``x``."""
        return self.amplitude * torch.sin(x + self.phase)

    def _points(self, generator: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
        low, high = self.x_range
        x = low + (high - low) * torch.rand(n, 1, generator=generator, dtype=torch.float32)
        return x, self.target(x)

    @classmethod
    def draw_slots(cls, tasks: Sequence[Task], streams: Stream, n: int) -> tuple[Tensor, Tensor]:
        if len(tasks) == 1:  # one slot: the same float32 arithmetic with its parameters as scalars
            t = tasks[0]
            a, p, lo, hi = (np.float32(v) for v in (t.amplitude, t.phase, *t.x_range))  # type: ignore[attr-defined]
            span = float(hi - lo)  # the float32 difference, as the batched tensors compute it
            x = float(lo) + span * streams.uniform(n).unsqueeze(-1)
            a, p = float(a), float(p)
            return x, a * torch.sin(x + p)
        params = torch.tensor([(t.amplitude, t.phase, *t.x_range) for t in tasks],  # type: ignore[attr-defined]
                              dtype=torch.float32).unsqueeze(1).unsqueeze(1)
        amplitude, phase, low, high = params.unbind(-1)  # [S, 1, 1] each
        x = low + (high - low) * streams.uniform(n).unsqueeze(-1)
        return x, amplitude * torch.sin(x + phase)

    def evaluation_split(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self._evaluation is None:
            k = self.adapt_size
            if self.shared_points:
                x = shared_evaluation_inputs(self.heldout_size, self.x_range)
                y = self.target(x)
                self._evaluation = (x[:k], y[:k], x, y)
            else:
                generator = torch.Generator().manual_seed(self.eval_seed)
                x, y = self._points(generator, k + self.heldout_size)
                self._evaluation = (x[:k], y[:k], x[k:], y[k:])
        return self._evaluation

    def __repr__(self) -> str:
        return f"SinusoidTask(amplitude={self.amplitude:.4g}, phase={self.phase:.4g})"


def shared_evaluation_inputs(n: int, x_range: tuple[float, float] = X_RANGE) -> Tensor:
    """The public code's evaluation inputs, ``[n, 1]`` float32: ``numpy.random.seed(2021)`` then
    ``numpy.random.uniform(low, high, n)`` (its ``sample_test_data``), the same for every task.
    Its 10 adaptation points are the first 10 of these: the same seed, the same stream."""
    x = np.random.RandomState(GRID_EVAL_SEED).uniform(x_range[0], x_range[1], n)
    return torch.tensor(x, dtype=torch.float32).unsqueeze(1)


def _sizes(spec: DataSpec) -> tuple[int, int, int, bool]:
    return (spec.tasks_per_client, spec.eval_adapt_size, spec.eval_heldout_size,
            spec.eval_points == "shared")


def build_sinusoid(spec: DataSpec, seed: int) -> Federation:
    """Finn et al.'s sinusoid family: clients and unseen clients generated lazily."""
    sizes = _sizes(spec)
    return _federation(
        spec,
        partial(_random_tasks, seed, "sinusoid/train", *sizes),
        partial(_random_tasks, seed, "sinusoid/unseen", *sizes),
        partial(_random_tasks_many, seed, "sinusoid/train", *sizes),
    )


def build_sinusoid_grid(spec: DataSpec, seed: int) -> Federation:
    """The MOML sinewave protocol: 25 fixed grid tasks for training, random unseen test tasks.

    ``seed`` is accepted for a uniform interface; nothing here depends on it (see module docstring).
    """
    sizes = _sizes(spec)
    return _federation(
        spec,
        partial(_indexed_tasks, grid_parameters, "sinusoid_grid/train", *sizes),
        partial(_indexed_tasks, grid_test_parameters, "sinusoid_grid/test", *sizes),
    )


def _federation(
    spec: DataSpec,
    client_tasks: Callable[[int], list[Task]],
    unseen_tasks: Callable[[int], list[Task]],
    many_client_tasks: Callable[[list[int]], list[list[Task]]] | None = None,
) -> Federation:
    return Federation(
        num_clients=spec.num_clients,
        num_unseen=spec.unseen_clients,
        input_shape=(1,),
        num_outputs=1,
        task_type="regression",
        _client_tasks=client_tasks,
        _unseen_tasks=unseen_tasks,
        _many_client_tasks=many_client_tasks,
    )


def _random_tasks(
    seed: int, stream: str, count: int, adapt_size: int, heldout_size: int, shared: bool, cid: int
) -> list[Task]:
    return _random_tasks_many(seed, stream, count, adapt_size, heldout_size, shared, [cid])[0]


def _random_tasks_many(
    seed: int, stream: str, count: int, adapt_size: int, heldout_size: int, shared: bool,
    cids: list[int]
) -> list[list[Task]]:
    """Tasks of many clients at once: task ``t`` of client ``cid`` takes its amplitude, phase and
    evaluation seed from the counter stream keyed by (seed, stream, cid) at position ``t``, so a
    client's tasks are the same built alone or in a batch."""
    keys = derive_keys(seed, cids, zlib.crc32(stream.encode()))
    bits = Stream(keys).expand().child(np.arange(count)).bits(3)  # [C, count, 3]
    u = (bits[..., :2] >> np.uint64(11)).astype(np.float64) * 2.0**-53  # uniform in [0, 1)
    amplitude = AMPLITUDE_RANGE[0] + (AMPLITUDE_RANGE[1] - AMPLITUDE_RANGE[0]) * u[..., 0]
    phase = PHASE_RANGE[0] + (PHASE_RANGE[1] - PHASE_RANGE[0]) * u[..., 1]
    eval_seed = (bits[..., 2] >> np.uint64(1)).astype(np.int64)  # 63 bits
    return [[SinusoidTask(a, p, e, adapt_size, heldout_size, shared_points=shared)
             for a, p, e in zip(*rows)]
            for rows in zip(amplitude.tolist(), phase.tolist(), eval_seed.tolist())]


def grid_parameters(g: int) -> tuple[float, float]:
    """Amplitude and phase of grid task ``g`` (0..24), amplitude-major as in the public code."""
    return float(GRID_AMPLITUDES[g // 5]), GRID_PHASES[g % 5]


def grid_test_parameters(q: int) -> tuple[float, float]:
    """Amplitude and phase of test task ``q``: the public code's ``sample_amp_pha(seed=q)``."""
    legacy = np.random.RandomState(q)
    amplitude = legacy.uniform(*GRID_TEST_AMPLITUDE_RANGE)
    phase = legacy.uniform(*GRID_TEST_PHASE_RANGE)
    return float(amplitude), float(phase)


def _indexed_tasks(
    parameters: Callable[[int], tuple[float, float]],
    stream: str,
    count: int,
    adapt_size: int,
    heldout_size: int,
    shared: bool,
    cid: int,
) -> list[Task]:
    """Tasks ``cid * count .. cid * count + count - 1`` of a numbered task list (grid or test)."""
    tasks: list[Task] = []
    for q in range(cid * count, (cid + 1) * count):
        eval_seed = derived_seed(GRID_EVAL_SEED, stream, q)
        tasks.append(SinusoidTask(*parameters(q), eval_seed, adapt_size, heldout_size,
                                  shared_points=shared))
    return tasks
