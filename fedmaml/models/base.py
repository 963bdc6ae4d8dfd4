"""Functional models made of stages, one stage per layer group (the low-level API).

The built-in models are ``nn.Sequential`` modules run by fedmaml/models/module.py, like a user's
module; this module keeps the hand-written stage interface for models written directly as stages,
and the 2x2 max-pool those modules share.

A :class:`StagedModel` is a sequence of stages ``h_l = stage_l(params_l, h_{l-1})``. Each stage owns
exactly one *layer group* (a conv/linear weight, its bias and the BatchNorm affine that follows it),
so a Lambda pattern's columns are the stages, and the output of a frozen prefix of stages is a
natural cache point for restricted adaptation.

Parameters live outside the model in an ordered ``"<group>.<tensor>" -> Tensor`` dict, which keeps
every forward pass a pure function (``torch.func`` transforms and ``vmap`` need that).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The interface lives in the core (which computes through it); re-exported here for users.
from fedmaml.core.staged import Stage, StagedModel  # noqa: F401


def _uniform(shape: Sequence[int], bound: float, g: torch.Generator) -> Tensor:
    return (torch.rand(*shape, generator=g) * 2 - 1) * bound


class Linear:
    """``act(h @ W^T + b)``; initialised like ``torch.nn.Linear``."""

    def __init__(self, name: str, in_features: int, out_features: int, relu: bool,
                 flatten: bool = False) -> None:
        self.name, self.in_features, self.out_features = name, in_features, out_features
        self.relu, self.flatten = relu, flatten

    def init(self, g: torch.Generator) -> dict[str, Tensor]:
        bound = 1 / math.sqrt(self.in_features)
        return {"weight": _uniform((self.out_features, self.in_features), bound, g),
                "bias": _uniform((self.out_features,), bound, g)}

    def __call__(self, p: dict[str, Tensor], h: Tensor) -> Tensor:
        if self.flatten:
            h = h.flatten(-(h.dim() - 1)) if h.dim() > 2 else h
        h = F.linear(h, p["weight"], p["bias"])
        return F.relu(h) if self.relu else h


def max_pool_2x2(h: Tensor) -> Tensor:
    """2x2 max-pooling with ceil mode, as TensorFlow's 'SAME' pooling of the original MAML code
    (28 -> 14 -> 7 -> 4 -> 2).

    When no reverse-mode gradient can flow through ``h`` (a frozen prefix under Lambda-pattern
    caching, evaluation), the pool is the elementwise maximum of four strided views: the same
    values, 4-15x faster on CPU than ``F.max_pool2d`` on the default memory layout, which dominated
    a frozen Conv-4 prefix. With a gradient, ``F.max_pool2d``'s backward is the fast one. Both are
    vmap-safe (a channels-last copy is not). Forward-mode AD (``jvp``, unused in fedmaml) also takes
    the views; there a tie between equal positive values splits the tangent where ``max_pool2d``
    gives it to one of them.
    """
    if torch.is_grad_enabled() and h.requires_grad:
        return F.max_pool2d(h, 2, ceil_mode=True)
    return _pool_views(h)


def _pool_views(h: Tensor) -> Tensor:
    height, width = h.shape[-2:]
    if height % 2 or width % 2:
        h = F.pad(h, (0, width % 2, 0, height % 2), value=float("-inf"))
    rows = torch.maximum(h[..., 0::2, :], h[..., 1::2, :])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


class ModuleStage:
    """Wrap any ``nn.Module`` as a stage (its parameters become the group); forward via functional_call."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name, self.module = name, module

    def init(self, g: torch.Generator) -> dict[str, Tensor]:
        # Module parameters were initialised when the module was built; copy them.
        return {k: v.detach().clone() for k, v in self.module.named_parameters()}

    def __call__(self, p: dict[str, Tensor], h: Tensor) -> Tensor:
        return torch.func.functional_call(self.module, p, (h,))
