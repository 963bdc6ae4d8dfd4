"""Adaptation under a Lambda pattern, with the skipped work really skipped.

Step ``s`` updates only the groups its pattern row selects:
``theta_l <- theta_l - alpha * grad_{theta_l} L(theta; S)`` for ``Lambda[s, l] = 1``.

Two mechanisms turn skipped groups into saved time
(docs/algorithms.md#compute-is-skipped-not-multiplied-by-zero):

1. **Only adapted tensors are differentiated.** The gradient is taken with respect to the
   adapted groups alone; frozen tensors enter as constants, so backpropagation stops at the lowest
   adapted group and computes no weight gradients for frozen layers.
2. **Prefix caching.** Groups below the lowest group that any *remaining* step adapts never change
   again, so their output on the support batch is computed once and reused. In first-order mode the
   cache is a constant (the adaptation is not differentiated); in second-order mode it keeps its
   graph to ``w`` so that frozen groups still receive meta-gradients through it. BatchNorm with batch
   statistics caches exactly, because the support batch is fixed within one adaptation.

Everything is written without data-dependent Python branches and with gradients from
``torch.func`` inside transforms (``fedmaml.core.autodiff``: plain autograd outside them, the same
numbers faster), so it runs under ``vmap`` across a cohort of clients and composes with an outer
``vjp`` for second order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedmaml.core.autodiff import grad_and_value
from fedmaml.core.losses import LossFn
from fedmaml.core.params import Params, detach
from fedmaml.core.patterns import Pattern
from fedmaml.core.staged import StagedModel


def adapt(
    model: StagedModel,
    params: Params,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    pattern: Pattern,
    alpha: float | Tensor,
    *,
    differentiable: bool = False,
    cache_prefix: bool = True,
    trajectory: list[Params] | None = None,
) -> Params:
    """Adapt ``params`` on the batch ``(x, y)`` following ``pattern``; return the adapted params.

    ``differentiable=False`` (first order): the result is detached from ``params``.
    ``differentiable=True`` (second order): the result stays a differentiable function of ``params``
    (use it inside ``torch.func.vjp``/``grad``), including through the cached prefix.
    ``trajectory``, if given, receives the parameters *before* each step (for Hessian-free products).
    """
    pattern.validate(model.group_names, model.name)  # a too-short row would adapt the wrong groups
    theta = dict(params) if differentiable else detach(params)
    # A user's module that is not a sequence of stages runs whole: nothing to cache.
    cache_prefix = cache_prefix and getattr(model, "staged", True)
    level, h = 0, x  # h is the output of groups [0, level) on the support batch
    for s in range(pattern.steps):
        if trajectory is not None:
            trajectory.append(theta)
        groups = pattern.adapted(s)
        if not groups:
            continue
        if cache_prefix:
            low = pattern.lowest_adapted_from(s)
            if low > level:  # groups [level, low) are final from step s on: advance the cache
                h = model.forward(theta, h, start=level, stop=low)
                level = low
        names = model.names_of(groups)
        adapted = {n: theta[n] for n in names}
        if differentiable:
            grads = torch.func.grad(_step_loss)(adapted, theta, model, h, y, loss_fn, level)
        else:
            grads, _ = grad_and_value(_step_loss, adapted, theta, model, h, y, loss_fn, level)
        theta = {**theta, **{n: theta[n] - alpha * grads[n] for n in names}}
    return theta


def _step_loss(adapted: Params, theta: Params, model: StagedModel, h: Tensor, y: Tensor,
               loss_fn: LossFn, level: int) -> Tensor:
    # `theta`'s other tensors are closed-over constants for this gradient: no work is spent on them.
    return loss_fn(model.forward({**theta, **adapted}, h, start=level), y)


def query_loss(model: StagedModel, params: Params, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
    return loss_fn(model.forward(params, x), y)
