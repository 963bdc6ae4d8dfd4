"""How well a memory tracks its target (docs/algorithms.md#moml-the-memory; docs/participation.md).

MOML's memory ``u_i`` is a momentum average of the client's adaptations ``A_i(w_t; S)`` and is
meant to track ``A_i(w_t)``, the adaptation of the *current* meta-model. Between participations
``w`` moves and ``u_i`` does not, so the gap grows with the memory's age.
"""

from __future__ import annotations

from torch import Tensor

from fedmaml.core.adaptation import adapt
from fedmaml.core.losses import LossFn
from fedmaml.core.params import Params, norm, sub
from fedmaml.core.patterns import Pattern
from fedmaml.core.staged import StagedModel


def tracking_error(model: StagedModel, loss_fn: LossFn, w: Params, u: Params, x: Tensor, y: Tensor,
                   pattern: Pattern, alpha: float) -> Tensor:
    """``||u - A(w)|| / ||A(w)||`` with ``A(w) = adapt(w; (x, y), pattern, alpha)``: the Euclidean
    norm over all parameters of the memory's distance to the adaptation of ``w`` on ``(x, y)``,
    relative to the norm of that adaptation."""
    target = adapt(model, w, x, y, loss_fn, pattern, alpha)
    return (norm(sub(u, target)) / norm(target)).detach()
