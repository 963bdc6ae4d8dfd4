"""Multi-layer perceptron: an ``nn.Sequential`` whose linear layers (weight + bias) are the layer groups.

It runs through the same adapter as a user's module (fedmaml/models/module.py); the factory fills the
weights with the draws fedmaml has always used, so a seed gives the same initial parameters as in
earlier runs (docs/results/short_run.json) under the same names (``layer1.weight``, ...).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from fedmaml.models.module import ModuleModel


def uniform_(t: torch.Tensor, bound: float, g: torch.Generator) -> None:
    """Fill ``t`` with U(-bound, bound) drawn from ``g``, as ``(rand * 2 - 1) * bound``: the draws
    (and the float rounding) of fedmaml's initialisation since its first release."""
    t.copy_((torch.rand(*t.shape, generator=g) * 2 - 1) * bound)


def uninitialised(cls: type[nn.Module], *args, **kwargs) -> nn.Module:
    """``cls(*args, **kwargs)`` whose values the caller overwrites: torch's default initialisation
    runs on a forked global generator, so building a model leaves torch's random state as it was
    (``nn.utils.skip_init`` would avoid the draws but imports torch's reference ops, ~0.3 s)."""
    with torch.random.fork_rng(devices=[]):
        return cls(*args, **kwargs)


def init_linear_(layer: nn.Linear, g: torch.Generator) -> None:
    """``torch.nn.Linear``'s distribution (U(+-1/sqrt(fan_in)) for weight and bias), drawn from ``g``."""
    bound = 1 / math.sqrt(layer.in_features)
    uniform_(layer.weight, bound, g)
    uniform_(layer.bias, bound, g)


def mlp_module(input_shape: Sequence[int], hidden: Sequence[int], num_outputs: int,
               seed: int = 0) -> nn.Sequential:
    """Children ``layer1, relu1, layer2, ...``, with a leading ``flatten`` for inputs of more than
    one dimension; initial weights a deterministic function of ``seed`` (torch's global generator
    is neither used nor changed)."""
    sizes = [math.prod(input_shape), *hidden, num_outputs]
    children: dict[str, nn.Module] = {}
    if len(input_shape) > 1:
        children["flatten"] = nn.Flatten()
    g = torch.Generator().manual_seed(seed)
    for i in range(len(sizes) - 1):
        layer = uninitialised(nn.Linear, sizes[i], sizes[i + 1])
        with torch.no_grad():
            init_linear_(layer, g)
        children[f"layer{i + 1}"] = layer
        if i < len(hidden):
            children[f"relu{i + 1}"] = nn.ReLU()
    return nn.Sequential(OrderedDict(children))


def mlp(input_shape: Sequence[int], hidden: Sequence[int], num_outputs: int) -> ModuleModel:
    """E.g. the sinusoid regressor 1-40-40-1 is ``mlp((1,), [40, 40], 1)``.

    Inputs with more than one dimension (e.g. ``[1, 8, 8]`` images) are flattened by the first layer.
    """
    def build(seed: int) -> nn.Module:
        return mlp_module(input_shape, hidden, num_outputs, seed)

    sizes = [math.prod(input_shape), *hidden, num_outputs]
    return ModuleModel(build(0), "mlp-" + "-".join(map(str, sizes)), reinit=build)
