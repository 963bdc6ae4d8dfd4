"""MOML's memory: each task's personalized model ``u_i`` and how it moves
(docs/algorithms.md#moml-the-memory).

* initialisation at first participation: ``u_i = A_i(w; S_0)``;
* momentum update when sampled: ``u_i <- (1 - beta) u_i + beta A_i(w_t; S)``;
* ``decay_to_w`` (MOML-V2 flavour) for tasks *not* sampled in a step: ``u_i <- (1 - beta) u_i + beta w_t``.

Memories are always stored detached: the meta-gradient treats ``u_i`` as a constant point.
A silo keeps its tasks' memories stacked along a leading task axis; ``gather``/``scatter`` read and
write one task by a (possibly batched) index tensor without in-place updates, so they work under vmap.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedmaml.core.adaptation import adapt
from fedmaml.core.losses import LossFn
from fedmaml.core.params import Params, detach, lerp
from fedmaml.core.patterns import Pattern
from fedmaml.core.staged import StagedModel


def init_memory(model: StagedModel, loss_fn: LossFn, w: Params, x: Tensor, y: Tensor,
                pattern: Pattern, alpha: float) -> Params:
    """``u = A(w; S_0)``."""
    return adapt(model, w, x, y, loss_fn, pattern, alpha)


def momentum_update(u: Params, adapted: Params, beta: float) -> Params:
    """``(1 - beta) u + beta A(w; S)``; with ``beta = 1`` exactly ``A(w; S)`` (FO-MAML)."""
    return detach(lerp(u, adapted, beta))


def decay_to_w(memory: Params, w: Params, beta: float) -> Params:
    """Move every stacked memory towards ``w``: ``(1 - beta) u + beta w`` (broadcast over tasks)."""
    return {k: ((1 - beta) * m + beta * w[k].unsqueeze(0)).detach() for k, m in memory.items()}


def gather(memory: Params, index: Tensor) -> Params:
    """Task ``index``'s memory out of a stacked memory."""
    # A single task (every cross-device client) is a view: the index can only be 0. The branch is
    # on a shape, so it is the same for a whole vmapped cohort.
    return {k: m[0] if m.shape[0] == 1 else m.index_select(0, index.reshape(1)).squeeze(0)
            for k, m in memory.items()}


def scatter(memory: Params, index: Tensor, u: Params) -> Params:
    """A new stacked memory whose task ``index`` holds ``u``."""
    out = {}
    for k, m in memory.items():
        if m.shape[0] == 1:  # a single task: ``u`` is the whole memory (see gather)
            out[k] = u[k].to(m.dtype).unsqueeze(0)
            continue
        hit = torch.arange(m.shape[0], device=m.device) == index
        out[k] = torch.where(hit.reshape(-1, *[1] * (m.dim() - 1)), u[k].unsqueeze(0), m)
    return out
