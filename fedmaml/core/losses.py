"""Task losses and metrics (batch means, so they are pure functions usable under vmap)."""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor

from fedmaml.errors import ConfigError
from fedmaml.user_objects import Registry

LossFn = Callable[[Tensor, Tensor], Tensor]


def mse(pred: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(pred, y)


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y)


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(-1) == y).float().mean()


def loss_for(task_type: str) -> LossFn:
    return mse if task_type == "regression" else cross_entropy


_LOSSES = Registry("model.loss", "package.module:function")
_BUILT_IN = {"mse": (mse, "regression", "float targets"),
             "cross_entropy": (cross_entropy, "classification", "integer labels")}


def loss_named(name: str, task_type: str) -> LossFn:
    """``model.loss``: ``auto`` follows the data (:func:`loss_for`), ``mse`` and ``cross_entropy``
    must fit it, anything else is the import path of the user's own ``f(prediction, target)``."""
    if name == "auto":
        return loss_for(task_type)
    if name in _BUILT_IN:
        fn, kind, targets = _BUILT_IN[name]
        if task_type != kind:
            raise ConfigError(f"model.loss: {name} needs {targets} ({kind}), but the data is "
                              f"{task_type}; use auto, the other built-in loss, or your own")
        return fn
    fn = _LOSSES.load(name, "a function f(prediction, target) -> a scalar tensor")
    if not callable(fn):
        raise ConfigError(f"model.loss: {name!r} is a {type(fn).__name__}, not a function "
                          "f(prediction, target) -> a scalar tensor")
    return fn
