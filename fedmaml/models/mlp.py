"""Multi-layer perceptron; each linear layer (weight + bias) is one layer group."""

from __future__ import annotations

import math
from typing import Sequence

from fedmaml.models.base import Linear, StagedModel


def mlp(input_shape: Sequence[int], hidden: Sequence[int], num_outputs: int) -> StagedModel:
    """E.g. the sinusoid regressor 1-40-40-1 is ``mlp((1,), [40, 40], 1)``.

    Inputs with more than one dimension (e.g. ``[1, 8, 8]`` images) are flattened by the first layer.
    """
    sizes = [math.prod(input_shape), *hidden, num_outputs]
    stages = [Linear(f"layer{i + 1}", sizes[i], sizes[i + 1], relu=i < len(hidden),
                     flatten=i == 0 and len(input_shape) > 1)
              for i in range(len(sizes) - 1)]
    return StagedModel("mlp-" + "-".join(map(str, sizes)), stages)
