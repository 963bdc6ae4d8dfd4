"""Server side: averaging client updates and the server optimizer (ALGORITHMS.md §5 step 4).

``w_{r+1} = w_r + server_lr * avg(delta)`` for SGD; momentum and Adam treat ``-avg(delta)`` as a
gradient (FedAvgM, FedAdam). The optimizer state is a dict of tensors so it can be checkpointed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedmaml.core.params import Params, mean


def aggregate(deltas: list[Params], num_examples: list[int], weighting: str) -> Params:
    """Mean of client updates, ``weighted`` by example counts or ``uniform``."""
    if weighting not in ("weighted", "uniform"):
        raise ValueError(f"aggregation must be 'weighted' or 'uniform', got {weighting!r}")
    return mean(deltas, num_examples if weighting == "weighted" else None)


@dataclass
class ServerOptimizer:
    kind: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("sgd", "momentum", "adam"):
            raise ValueError(f"server optimizer must be sgd, momentum or adam, got {self.kind!r}")

    def step(self, w: Params, delta: Params) -> Params:
        self.steps += 1
        if self.kind == "sgd":
            return {k: w[k] + self.lr * delta[k] for k in w}
        if self.kind == "momentum":
            for k in w:
                self.state[f"m.{k}"] = self.momentum * self.state.get(f"m.{k}", 0) + delta[k]
            return {k: w[k] + self.lr * self.state[f"m.{k}"] for k in w}
        b1, b2 = self.betas
        out = {}
        for k in w:
            m = b1 * self.state.get(f"m.{k}", 0) + (1 - b1) * delta[k]
            v = b2 * self.state.get(f"v.{k}", 0) + (1 - b2) * delta[k] ** 2
            self.state[f"m.{k}"], self.state[f"v.{k}"] = m, v
            m_hat, v_hat = m / (1 - b1 ** self.steps), v / (1 - b2 ** self.steps)
            out[k] = w[k] + self.lr * m_hat / (v_hat.sqrt() + self.eps)
        return out
