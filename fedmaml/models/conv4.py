"""Conv-4 (Finn et al. 2017): four [3x3 conv, BatchNorm, ReLU, 2x2 max-pool] blocks and a linear head.

An ``nn.Sequential`` on the same adapter as a user's module (fedmaml/models/module.py). Layer groups:
``conv1 .. conv4`` (each conv with its bias and BatchNorm affine) and ``head``; parameters keep the
names of earlier runs (``conv1.weight``, ``conv1.bias``, ``conv1.bn_weight``, ``conv1.bn_bias``,
``head.weight``, ``head.bias``) and a seed gives the same initial values. BatchNorm normalises with
the current batch's statistics, as in MAML. ``strided=True`` replaces max-pooling by stride-2
convolutions (Finn's Omniglot variant).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from fedmaml.models.mlp import init_linear_, uniform_, uninitialised
from fedmaml.models.module import ModuleModel


def _block(cin: int, cout: int, strided: bool, g: torch.Generator) -> nn.Sequential:
    conv = uninitialised(nn.Conv2d, cin, cout, 3, stride=2 if strided else 1, padding=1)
    bn = uninitialised(nn.BatchNorm2d, cout)
    with torch.no_grad():
        bound = 1 / math.sqrt(cin * 9)
        uniform_(conv.weight, bound, g)
        uniform_(conv.bias, bound, g)
        bn.weight.fill_(1.0)
        bn.bias.zero_()
    # ceil mode: TensorFlow's 'SAME' pooling of the original MAML code (28 -> 14 -> 7 -> 4 -> 2)
    tail = {} if strided else {"pool": nn.MaxPool2d(2, ceil_mode=True)}
    return nn.Sequential(OrderedDict({"conv": conv, "bn": bn, "relu": nn.ReLU(), **tail}))


def conv4_module(input_shape: Sequence[int], num_outputs: int, width: int = 64,
                 strided: bool = False, seed: int = 0) -> nn.Sequential:
    """Children ``conv1 .. conv4`` (each ``conv, bn, relu[, pool]``), ``flatten``, ``head``."""
    if len(input_shape) != 3:
        raise ValueError(f"conv4 needs image inputs [channels, height, width], got {list(input_shape)}")
    g = torch.Generator().manual_seed(seed)
    blocks = {f"conv{i + 1}": _block(input_shape[0] if i == 0 else width, width, strided, g)
              for i in range(4)}
    # Each block halves height and width, rounding up (3x3 conv with padding 1, then a ceil-mode
    # pool or stride 2): the head's input size follows from the image size.
    height, width_ = input_shape[1:]
    for _ in range(4):
        height, width_ = (height + 1) // 2, (width_ + 1) // 2
    features = width * height * width_
    head = uninitialised(nn.Linear, features, num_outputs)
    with torch.no_grad():
        init_linear_(head, g)
    return nn.Sequential(OrderedDict({**blocks, "flatten": nn.Flatten(), "head": head}))


def conv4(input_shape: Sequence[int], num_outputs: int, width: int = 64,
          strided: bool = False) -> ModuleModel:
    def build(seed: int) -> nn.Module:
        return conv4_module(input_shape, num_outputs, width, strided, seed)

    names = {f"conv{i}.{part}.{t}": f"conv{i}.{prefix}{t}" for i in range(1, 5)
             for part, prefix in (("conv", ""), ("bn", "bn_")) for t in ("weight", "bias")}
    names.update({"head.weight": "head.weight", "head.bias": "head.bias"})
    suffix = "-strided" if strided else ""
    return ModuleModel(build(0), f"conv4-w{width}{suffix}", reinit=build, param_names=names)
