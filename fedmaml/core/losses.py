"""Task losses and metrics (batch means, so they are pure functions usable under vmap)."""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]


def mse(pred: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(pred, y)


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y)


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(-1) == y).float().mean()


def loss_for(task_type: str) -> LossFn:
    return mse if task_type == "regression" else cross_entropy
