"""FedAvg (McMahan et al. 2017): local SGD on support + query; personalization comes only from
fine-tuning at evaluation (``evaluation.steps > 0``), the usual pFL reference point."""

from __future__ import annotations

import torch
from torch import Tensor

from fedmaml.algorithms.base import Algorithm, Hyper, RoundData, mean_metrics, step_batches
from fedmaml.core.adaptation import query_loss
from fedmaml.core.estimators import loss_grad
from fedmaml.core.losses import LossFn
from fedmaml.core.params import Params, mean, scale, sub
from fedmaml.models.base import StagedModel


class FedAvg(Algorithm):
    name = "fedavg"
    uses_memory = False

    def needs_extra_batch(self, hp: Hyper) -> bool:
        return False

    def local_round(self, model: StagedModel, loss_fn: LossFn, hp: Hyper, w: Params,
                    memory: Params | None, data: RoundData
                    ) -> tuple[Params, None, dict[str, Tensor]]:
        H, B = data.task_index.shape
        metrics = []
        for h in range(H):
            grads, queries = [], []
            for b in range(B):
                (xs, ys), (xq, yq), _ = step_batches(data, h, b)
                g, _ = loss_grad(model, w, torch.cat([xs, xq]), torch.cat([ys, yq]), loss_fn)
                grads.append(g)
                before = ({"loss_before": query_loss(model, w, xq, yq, loss_fn).detach()}
                          if hp.step.loss_before else {})
                queries.append((xq, yq, before))
            w = sub(w, scale(mean(grads), hp.eta))
            # "after" = the task's query loss after this local step (FedAvg adapts nothing per task)
            metrics += [{**before, "loss_after": query_loss(model, w, xq, yq, loss_fn).detach()}
                        for xq, yq, before in queries]
        return w, None, mean_metrics(metrics)


FEDAVG = FedAvg()
