"""Personalized evaluation of one task: adapt from a start point, then measure
(docs/algorithms.md#evaluation)."""

from __future__ import annotations

from torch import Tensor

from fedmaml.core.adaptation import adapt
from fedmaml.core.losses import LossFn, accuracy
from fedmaml.core.params import Params
from fedmaml.core.patterns import Pattern
from fedmaml.core.staged import StagedModel


def personalized_metrics(model: StagedModel, loss_fn: LossFn, start: Params, adapt_x: Tensor,
                         adapt_y: Tensor, heldout_x: Tensor, heldout_y: Tensor, pattern: Pattern,
                         alpha: float, classification: bool) -> dict[str, Tensor]:
    """Adapt ``start`` on the task's adaptation split with ``pattern``; loss (and accuracy) held out."""
    adapted = adapt(model, start, adapt_x, adapt_y, loss_fn, pattern, alpha)
    out = model.forward(adapted, heldout_x).detach()
    metrics = {"loss": loss_fn(out, heldout_y)}
    if classification:
        metrics["accuracy"] = accuracy(out, heldout_y)
    return metrics
