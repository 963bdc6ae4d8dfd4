"""Conv-4 (Finn et al. 2017): four [3x3 conv, BatchNorm, ReLU, 2x2 max-pool] blocks and a linear head.

Layer groups: ``conv1 .. conv4`` (each conv with its bias and BatchNorm affine) and ``head``.
``strided=True`` replaces max-pooling by stride-2 convolutions (Finn's Omniglot variant).
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedmaml.models.base import ConvBlock, Linear, StagedModel


def conv4(input_shape: Sequence[int], num_outputs: int, width: int = 64,
          strided: bool = False) -> StagedModel:
    if len(input_shape) != 3:
        raise ValueError(f"conv4 needs image inputs [channels, height, width], got {list(input_shape)}")
    blocks = [ConvBlock(f"conv{i + 1}", input_shape[0] if i == 0 else width, width, strided)
              for i in range(4)]
    # The head's input size follows from the image size: run the blocks once on a dummy batch.
    h = torch.zeros(2, *input_shape)
    g = torch.Generator().manual_seed(0)
    for b in blocks:
        h = b(b.init(g), h)
    features = h[0].numel()
    head = Linear("head", features, num_outputs, relu=False, flatten=True)
    suffix = "-strided" if strided else ""
    return StagedModel(f"conv4-w{width}{suffix}", [*blocks, head])
