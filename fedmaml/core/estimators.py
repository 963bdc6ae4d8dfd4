"""Meta-gradient estimators (docs/algorithms.md#meta-gradient-estimators).

For a task with memory (or adapted parameters) ``u``, query batch ``Q`` and ``v = grad L(u; Q)``:

* ``first_order``:   ``G = v``.
* ``second_order``:  ``G = J_A(w)^T v``, exact through the Lambda-restricted adaptation ``A``
  (a ``torch.func.vjp`` of :func:`~fedmaml.core.adaptation.adapt`). Frozen groups get the identity on
  their own block plus the cross terms through adapted groups.
* ``hessian_free``:  Per-FedAvg's estimate ``(I - alpha H) v ~= v - alpha (grad L(w + d v; S') -
  grad L(w - d v; S')) / (2 d)`` on an independent batch ``S'``. For a multi-step pattern the same
  product is applied step by step backwards along the adaptation trajectory, with each step's
  Hessian-vector product restricted to the groups that step adapts:
  ``J^T v = J_0^T (J_1^T (... J_{S-1}^T v))``, ``J_s^T = I - alpha H(theta_s) P_s``.

  The perturbation is ``d v`` (``hf_perturbation: absolute``, Fallah et al.'s form) or
  ``(d / ||P_s v||) v`` (``normalized``): a unit-length step of size ``d`` whatever the scale of
  ``v``, so that a large query gradient does not push the difference quotient far from the
  linear regime (the estimate is divided by the same step, so both estimate ``H v``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fedmaml.core.adaptation import adapt, query_loss
from fedmaml.core.autodiff import grad_and_value
from fedmaml.core.losses import LossFn
from fedmaml.core.params import Params, detach
from fedmaml.core.patterns import Pattern
from fedmaml.core.staged import StagedModel

Estimator = Literal["first_order", "second_order", "hessian_free"]
ESTIMATORS: tuple[str, ...] = ("first_order", "second_order", "hessian_free")
#: How the Hessian-free estimator scales its finite-difference step (see the module docstring).
HF_PERTURBATIONS: tuple[str, ...] = ("absolute", "normalized")


def loss_grad(model: StagedModel, params: Params, x: Tensor, y: Tensor,
              loss_fn: LossFn) -> tuple[Params, Tensor]:
    """``(grad L(params; x, y), L(params; x, y))`` with ``params`` treated as constants otherwise."""
    return grad_and_value(lambda p: query_loss(model, p, x, y, loss_fn), detach(params))


def adapt_with_vjp(model: StagedModel, w: Params, x: Tensor, y: Tensor, loss_fn: LossFn,
                   pattern: Pattern, alpha: float | Tensor, cache_prefix: bool = True):
    """Adapted parameters ``A(w)`` and a function ``v -> J_A(w)^T v`` (one adaptation for both)."""
    def fn(w_: Params) -> Params:
        return adapt(model, w_, x, y, loss_fn, pattern, alpha, differentiable=True,
                     cache_prefix=cache_prefix)
    adapted, vjp_fn = torch.func.vjp(fn, detach(w))
    return detach(adapted), lambda v: vjp_fn(v)[0]


def hessian_free_product(model: StagedModel, trajectory: list[Params], v: Params, x: Tensor,
                         y: Tensor, loss_fn: LossFn, pattern: Pattern, alpha: float | Tensor,
                         delta: float, perturbation: str = "absolute") -> Params:
    """Approximate ``J_A^T v`` by central finite differences of gradients on the batch ``(x, y)``.

    ``trajectory[s]`` holds the parameters before step ``s`` of the adaptation. ``perturbation``
    is ``absolute`` (step ``delta * v``) or ``normalized`` (step ``delta * v / ||P_s v||``).
    """
    if perturbation not in HF_PERTURBATIONS:
        raise ValueError(f"perturbation {perturbation!r} is not one of {list(HF_PERTURBATIONS)}")
    out = dict(v)
    for s in reversed(range(pattern.steps)):
        names = model.names_of(pattern.adapted(s))
        if not names:
            continue
        theta = trajectory[s]
        step: float | Tensor = delta
        if perturbation == "normalized":
            norm = torch.sqrt(sum((out[k].double() ** 2).sum() for k in names)).to(out[names[0]].dtype)
            # vmap-safe (no branch on the value): a zero v gives plus == minus and a zero product.
            step = delta / norm.clamp_min(torch.finfo(norm.dtype).tiny)
        plus = {k: (t + step * out[k]) if k in names else t for k, t in theta.items()}
        minus = {k: (t - step * out[k]) if k in names else t for k, t in theta.items()}
        g_plus, _ = loss_grad(model, plus, x, y, loss_fn)
        g_minus, _ = loss_grad(model, minus, x, y, loss_fn)
        out = {k: out[k] - alpha * (g_plus[k] - g_minus[k]) / (2 * step) for k in out}
    return out
