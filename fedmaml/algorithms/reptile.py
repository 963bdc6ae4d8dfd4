"""Reptile (Nichol, Achiam, Schulman 2018), federated.

For each sampled task, adapt ``w`` on support + query with the inner pattern (``alpha`` per step);
the update direction is ``G = w - theta``; ``w <- w - eta * mean(G)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedmaml.algorithms.base import Algorithm, Hyper, RoundData, mean_metrics, step_batches
from fedmaml.core.adaptation import adapt, query_loss
from fedmaml.core.losses import LossFn
from fedmaml.core.params import Params, mean, scale, sub
from fedmaml.models.base import StagedModel


class Reptile(Algorithm):
    name = "reptile"
    uses_memory = False

    def needs_extra_batch(self, hp: Hyper) -> bool:
        return False

    def local_round(self, model: StagedModel, loss_fn: LossFn, hp: Hyper, w: Params,
                    memory: Params | None, data: RoundData
                    ) -> tuple[Params, None, dict[str, Tensor]]:
        H, B = data.task_index.shape
        metrics = []
        for h in range(H):
            directions = []
            for b in range(B):
                (xs, ys), (xq, yq), _ = step_batches(data, h, b)
                x, y = torch.cat([xs, xq]), torch.cat([ys, yq])
                theta = adapt(model, w, x, y, loss_fn, hp.step.inner_pattern, hp.step.alpha,
                              cache_prefix=hp.step.cache_prefix)
                directions.append(sub(w, theta))
                m = {"loss_after": query_loss(model, theta, xq, yq, loss_fn).detach()}
                if hp.step.loss_before:  # a forward pass for the log only: asked for by the run
                    m["loss_before"] = query_loss(model, w, xq, yq, loss_fn).detach()
                metrics.append(m)
            w = sub(w, scale(mean(directions), hp.eta))
        return w, None, mean_metrics(metrics)


REPTILE = Reptile()
