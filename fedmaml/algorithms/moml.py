"""MOML / LocalMOML (Wang, Yuan, Ying, Yang, JMLR 2023): meta-learning with per-task memories.

Each local step samples ``B`` of the client's tasks; for each, the memory moves towards the adapted
model, ``u_i <- (1 - beta) u_i + beta A_i(w; S)``, and the meta-gradient is taken at ``u_i``;
then ``w <- w - eta * mean(G)``. After ``H`` steps the client returns ``w - w_r``. With ``H = 1`` and
one task per client this is one step of centralized MOML with ``B`` = number of participants.

``memory_policy: decay_to_w`` (MOML-V2 flavour, cross-silo only) also moves the memories of tasks not
sampled in a step towards ``w``; the sampled tasks' memory update adapts with the unbiased
``(n / B) * alpha`` step (the meta-gradient keeps ``alpha``).
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from fedmaml.algorithms.base import Algorithm, Hyper, RoundData, mean_metrics, step_batches
from fedmaml.core import memory as mem
from fedmaml.core.losses import LossFn
from fedmaml.core.params import Params, mean, scale, sub
from fedmaml.core.task_step import task_step
from fedmaml.models.base import StagedModel


class MetaLearner(Algorithm):
    """The MOML family; ``uses_memory=False`` gives FO-MAML / FedMeta / Per-FedAvg (``u = A(w; S)``)."""

    def __init__(self, name: str, uses_memory: bool) -> None:
        self.name, self.uses_memory = name, uses_memory

    def needs_extra_batch(self, hp: Hyper) -> bool:
        return hp.step.estimator == "hessian_free"

    def local_round(self, model: StagedModel, loss_fn: LossFn, hp: Hyper, w: Params,
                    memory: Params | None, data: RoundData
                    ) -> tuple[Params, Params | None, dict[str, Tensor]]:
        H, B = data.task_index.shape
        step = hp.step
        decay = self.uses_memory and hp.memory_policy == "decay_to_w"
        if decay:
            n_tasks = next(iter(memory.values())).shape[0]
            step = dataclasses.replace(step, memory_alpha_scale=n_tasks / B)
        metrics = []
        for h in range(H):
            grads = []
            new_memory = mem.decay_to_w(memory, w, step.beta) if decay else memory
            for b in range(B):
                support, query, extra = step_batches(data, h, b)
                idx = data.task_index[h, b]
                u = mem.gather(memory, idx) if self.uses_memory else None
                u_new, g, m = task_step(model, loss_fn, step, w, u, support, query, extra)
                if self.uses_memory:
                    new_memory = mem.scatter(new_memory, idx, u_new)
                grads.append(g)
                metrics.append(m)
            memory = new_memory
            w = sub(w, scale(mean(grads), hp.eta))
        return w, memory, mean_metrics(metrics)


MOML = MetaLearner("moml", uses_memory=True)
