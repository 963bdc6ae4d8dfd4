"""One task's meta-learning step as a pure function (docs/algorithms.md#moml-the-memory,
docs/algorithms.md#meta-gradient-estimators).

``(w, u, S, Q) -> (u', G, metrics)``: update the memory ``u`` with the adaptation of ``w`` on the
support batch, then compute the meta-gradient ``G`` at the new memory on the query batch.
With ``u = None`` (algorithms without memory, ``beta = 1``) the memory is just ``A(w; S)``, which is
FO-MAML / FedMeta / Per-FedAvg. No ``.item()``, no data-dependent branches: it can be vmapped.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fedmaml.core.adaptation import adapt, query_loss
from fedmaml.core.estimators import (ESTIMATORS, HF_PERTURBATIONS, Estimator, adapt_with_vjp,
                                     hessian_free_product, loss_grad)
from fedmaml.core.losses import LossFn
from fedmaml.core.memory import momentum_update
from fedmaml.core.params import Params, scale
from fedmaml.core.patterns import Pattern
from fedmaml.core.staged import StagedModel

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class StepConfig:
    """Static hyperparameters of a task step (hashable, so cohorts can be grouped by it)."""

    alpha: float
    beta: float
    estimator: Estimator
    inner_pattern: Pattern
    memory_pattern: Pattern
    hf_delta: float = 1e-3
    hf_perturbation: str = "absolute"  # or "normalized": a step of hf_delta along v / ||v||
    scale_by_beta: bool = False
    cache_prefix: bool = True
    #: The memory update adapts with ``memory_alpha_scale * alpha`` (MOML-V2's unbiased ``n / B``);
    #: the meta-gradient's Jacobian always uses ``alpha``.
    memory_alpha_scale: float = 1.0
    #: Also measure the query loss at ``w`` (metric ``loss_before``): a forward pass that feeds only
    #: a log line, so runs ask for it (``algorithm.loss_before``).
    loss_before: bool = False

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator {self.estimator!r} is not one of {list(ESTIMATORS)}")
        if self.hf_perturbation not in HF_PERTURBATIONS:
            raise ValueError(f"hf_perturbation {self.hf_perturbation!r} is not one of "
                             f"{list(HF_PERTURBATIONS)}")

    @property
    def memory_alpha(self) -> float:
        return self.alpha * self.memory_alpha_scale


def task_step(model: StagedModel, loss_fn: LossFn, cfg: StepConfig, w: Params, u: Params | None,
              support: Batch, query: Batch, hf_batch: Batch | None = None
              ) -> tuple[Params, Params, dict[str, Tensor]]:
    xs, ys = support
    xq, yq = query
    # One adaptation serves the memory and the estimator when both follow the same map.
    shared = cfg.memory_pattern == cfg.inner_pattern and cfg.memory_alpha_scale == 1
    vjp_fn = None
    trajectory: list[Params] | None = [] if cfg.estimator == "hessian_free" and shared else None
    if cfg.estimator == "second_order" and shared:
        adapted, vjp_fn = adapt_with_vjp(model, w, xs, ys, loss_fn, cfg.inner_pattern, cfg.alpha,
                                         cfg.cache_prefix)
    else:
        adapted = adapt(model, w, xs, ys, loss_fn, cfg.memory_pattern, cfg.memory_alpha,
                        cache_prefix=cfg.cache_prefix, trajectory=trajectory)
    u_new = adapted if u is None else momentum_update(u, adapted, cfg.beta)
    v, loss_after = loss_grad(model, u_new, xq, yq, loss_fn)

    if cfg.estimator == "first_order":
        g = v
    elif cfg.estimator == "second_order":
        if vjp_fn is None:  # the memory followed another pattern: differentiate the inner one
            _, vjp_fn = adapt_with_vjp(model, w, xs, ys, loss_fn, cfg.inner_pattern, cfg.alpha,
                                       cfg.cache_prefix)
        g = vjp_fn(v)
    else:
        if trajectory is None:
            trajectory = []
            adapt(model, w, xs, ys, loss_fn, cfg.inner_pattern, cfg.alpha,
                  cache_prefix=cfg.cache_prefix, trajectory=trajectory)
        if hf_batch is None:
            raise ValueError("the hessian_free estimator needs an independent batch (hf_batch)")
        g = hessian_free_product(model, trajectory, v, hf_batch[0], hf_batch[1], loss_fn,
                                 cfg.inner_pattern, cfg.alpha, cfg.hf_delta, cfg.hf_perturbation)
    if cfg.scale_by_beta:
        g = scale(g, cfg.beta)
    metrics = {"loss_after": loss_after.detach()}
    if cfg.loss_before:
        metrics["loss_before"] = query_loss(model, w, xq, yq, loss_fn).detach()
    return u_new, g, metrics
