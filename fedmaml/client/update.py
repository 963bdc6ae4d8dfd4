"""The client update batched: a cohort (``[C]``) and a batch of runs (``[R, C]``) under
``torch.func.vmap``, each client's part the algorithm's own :func:`client_update`."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch

from fedmaml.algorithms import Algorithm, Hyper, RoundData, client_update
from fedmaml.core.losses import LossFn
from fedmaml.core.params import Params


log = logging.getLogger("fedmaml")


#: The ``torch.compile`` backends tried in turn: inductor (fused C++ kernels), then, where it
#: cannot compile (no C++ compiler), ``aot_eager``: the update traced into one graph of ATen
#: operations, run without functorch's per-operation cost (about 2x faster than eager on a batch's
#: update over runs, docs/performance.md) and without a compiler.
BACKENDS = ("inductor", "aot_eager")


class CompiledUpdate:
    """``update`` (a batched client update: :func:`cohort_update`, :func:`runs_update`) compiled
    with ``torch.compile`` when ``enabled`` (``engine.compile``), on its first call; it compiles
    again for each new shape of its inputs (``dynamic=False``: shapes are few and fixed kernels
    are the fast ones). A backend that fails (no C++ compiler, an operation the compiler refuses)
    logs why and the next of :data:`BACKENDS` is tried; when none works, ``update`` runs eagerly
    from then on. The numbers agree with the eager call to float rounding."""

    def __init__(self, update: Callable[..., Any], enabled: bool, what: str) -> None:
        self.update, self.what = update, what
        self._compiled: Any = None  # None: compile with the next backend
        self._backends = list(BACKENDS) if enabled else []
        #: the backend in use (``None``: not compiled yet; ``"eager"``: none worked, or disabled)
        self.backend: str | None = None if enabled else "eager"

    def __call__(self, *args: Any) -> Any:
        while self.backend != "eager":
            if self._compiled is None:
                self.backend = self._backends.pop(0)
                self._compiled = torch.compile(self.update, dynamic=False, backend=self.backend)
            try:
                return self._compiled(*args)
            except Exception as e:  # noqa: BLE001 - e.g. no C++ compiler: the next backend
                then = self._backends[0] if self._backends else "eager"
                log.warning("%s: torch.compile (%s) of the client update failed (%s: %s); "
                            "running it with %s", self.what, self.backend, type(e).__name__, e,
                            "torch.compile (aot_eager)" if then == "aot_eager" else then)
                self._compiled, self.backend = None, then
        return self.update(*args)


def _batched(x: Any) -> int | None:
    return None if x is None else 0  # None inputs are not mapped


def cohort_update(algorithm: Algorithm, model: Any, loss_fn: LossFn, hp: Hyper, w: Params,
                  memory: Params | None, data: RoundData, initial: Params | None = None
                  ) -> tuple[Params, Params | None, dict[str, torch.Tensor]]:
    """:func:`~fedmaml.algorithms.client_update` vmapped over a cohort.

    ``w`` is shared; ``memory`` (``[C, tasks, ...]``, or ``None`` when the cohort initialises its
    memories or the algorithm keeps none) and every tensor of ``data`` are stacked along a leading
    client axis. ``initial`` (shared) is the initial meta-model of ``memory_init: initial_model``.
    Returns stacked deltas, memories (or ``None``) and metrics (``[C]`` each).
    """
    def one(w_, memory_, task_index, support, query, extra, init):
        delta, new_memory, metrics = client_update(
            algorithm, model, loss_fn, hp, w_, memory_,
            RoundData(task_index, support, query, extra, init), initial)
        return delta, ({} if new_memory is None else new_memory), metrics

    in_dims = (None, _batched(memory), 0, 0, 0, _batched(data.extra), _batched(data.init))
    delta, new_memory, metrics = torch.func.vmap(one, in_dims=in_dims)(
        w, memory, data.task_index, data.support, data.query, data.extra, data.init)
    return delta, (new_memory or None), metrics


def runs_update(algorithm: Algorithm, model: Any, loss_fn: LossFn, hp: Hyper, w: Params,
                memory: Params | None, data: RoundData, values: dict[str, torch.Tensor]
                ) -> tuple[Params, Params | None, dict[str, torch.Tensor]]:
    """:func:`cohort_update` vmapped over runs: ``w`` ``[R, ...]``, ``memory`` ``[R, C, ...]``,
    ``data`` ``[R, C, ...]`` (no init batch: first memories are made by
    :func:`initial_memories` before) and each hyperparameter of ``values`` (``eta``, ``alpha``,
    ``beta``, ``hf_delta``) ``[R]``."""
    def one(w_, memory_, task_index, support, query, extra, v):
        step = dataclasses.replace(hp.step, alpha=v["alpha"], beta=v["beta"],
                                   hf_delta=v["hf_delta"])
        hp_ = dataclasses.replace(hp, eta=v["eta"], step=step)
        delta, new_memory, metrics = cohort_update(
            algorithm, model, loss_fn, hp_, w_, memory_,
            RoundData(task_index, support, query, extra, None))
        return delta, ({} if new_memory is None else new_memory), metrics

    delta, new_memory, metrics = torch.func.vmap(
        one, in_dims=(0, _batched(memory), 0, 0, 0, _batched(data.extra), 0))(
        w, memory, data.task_index, data.support, data.query, data.extra, values)
    return delta, (new_memory or None), metrics


def initial_memories(algorithm: Algorithm, model: Any, loss_fn: LossFn, hp: Hyper, start: Params,
                     init: tuple[torch.Tensor, torch.Tensor], alpha: torch.Tensor) -> Params:
    """First memories ``A(w; S_0)`` of clients, as ``client_update`` makes them, vmapped: each
    client's starting model ``start`` (its run's ``w_r``, or the initial model), its init batch
    (``[N, tasks, K0, ...]``) and its run's ``alpha`` (``[N]``)."""
    def one(w_, x, y, a):
        step = dataclasses.replace(hp.step, alpha=a)
        return algorithm.initial_memory(model, loss_fn, dataclasses.replace(hp, step=step), w_,
                                        (x, y))

    return torch.func.vmap(one)(start, init[0], init[1], alpha)


def stack_rounds(rounds: list[RoundData]) -> RoundData:
    """Clients' round data (equal shapes) stacked along a new leading client axis."""
    def batch(get):
        parts = [get(r) for r in rounds]
        if parts[0] is None:
            return None
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    return RoundData(torch.stack([r.task_index for r in rounds]), batch(lambda r: r.support),
                     batch(lambda r: r.query), batch(lambda r: r.extra), batch(lambda r: r.init))
