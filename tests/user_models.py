"""Users' own modules for tests/test_user_model.py (importable as ``user_models:NAME``: pytest puts
tests/ on sys.path)."""

from __future__ import annotations

import math

import torch
from torch import nn


def mlp_like(input_shape, num_outputs, hidden=(40, 40)):
    """The built-in MLP as an nn.Sequential: Linear/ReLU pairs, flattening image inputs."""
    sizes = [math.prod(input_shape), *hidden, num_outputs]
    layers: list[nn.Module] = [nn.Flatten()] if len(input_shape) > 1 else []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def conv4_like(input_shape, num_outputs, width=4):
    """The built-in Conv-4 (max-pooling variant): four conv/BatchNorm/ReLU/pool blocks, a head."""
    def block(cin):
        return nn.Sequential(nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width),
                             nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True))
    blocks = [block(input_shape[0] if i == 0 else width) for i in range(4)]
    with torch.no_grad():
        features = nn.Sequential(*blocks)(torch.zeros(2, *input_shape))[0].numel()
    return nn.Sequential(*blocks, nn.Sequential(nn.Flatten(), nn.Linear(features, num_outputs)))


class Residual(nn.Module):
    """Not a Sequential: a residual MLP (runs whole, no prefix caching)."""

    def __init__(self, input_shape, num_outputs, width=16):
        super().__init__()
        self.inp = nn.Linear(math.prod(input_shape), width)
        self.block = nn.Linear(width, width)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x):
        h = torch.relu(self.inp(x.flatten(1)))
        h = h + torch.relu(self.block(h))
        return self.head(h)


class Branchy(Residual):
    """Data-dependent Python control flow: vmap cannot batch it."""

    def forward(self, x):
        h = torch.relu(self.inp(x.flatten(1)))
        if h.sum() > 0:  # a branch on a value
            h = h + torch.relu(self.block(h))
        return self.head(h)


class WithScale(Residual):
    """A parameter of the root module: in no default group."""

    def __init__(self, input_shape, num_outputs, width=16):
        super().__init__(input_shape, num_outputs, width)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.scale * super().forward(x)


class CountsCalls(Residual):
    """Writes a buffer in forward: refused."""

    def __init__(self, input_shape, num_outputs, width=16):
        super().__init__(input_shape, num_outputs, width)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def small_cnn(input_shape, num_outputs, width=4):
    """An image model that builds for any data (its first layer reads input_shape[0] channels)
    but whose forward needs images [batch, channels, height, width]."""
    return nn.Sequential(nn.Conv2d(input_shape[0], width, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_outputs))


def images_only(input_shape, num_outputs):
    """A factory that refuses inputs it was not written for, as users' factories do."""
    if len(input_shape) != 3:
        raise ValueError(f"expected images (C, H, W), got input_shape {input_shape}")
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_outputs))


class TypoInForward(nn.Module):
    """A module whose forward has a bug of its own (a misspelt name), whatever the data."""

    def __init__(self, input_shape, num_outputs):
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), num_outputs)

    def forward(self, x):
        return self.fc(x.flatten(1)) * scael  # noqa: F821 - the bug this model exists for


def not_a_module(input_shape, num_outputs):
    return "model"


def _copy_in(module: nn.Module, params: dict) -> nn.Module:
    """Load ``params`` (a built-in model's, in its order) into ``module``'s parameters (same order)."""
    with torch.no_grad():
        for (_, p), v in zip(module.named_parameters(), params.values(), strict=True):
            p.copy_(v)
    return module


def mlp_with_builtin_init(input_shape, num_outputs, hidden=(16,)):
    """mlp_like with the built-in MLP's initial weights for the seed fedmaml set (torch's seed)."""
    from fedmaml.models import mlp

    builtin = mlp(input_shape, list(hidden), num_outputs)
    return _copy_in(mlp_like(input_shape, num_outputs, hidden), builtin.init(torch.initial_seed()))


class InPlace(Residual):
    """Changes its input tensor in place."""

    def forward(self, x):
        x.clamp_(-3.0, 3.0)
        return super().forward(x)


def half_squared_error(pred, y):
    """A user's own loss (``model.loss: user_models:half_squared_error``): half of MSE, so its
    gradient is half of MSE's and doubling every step size gives MSE's training exactly."""
    return 0.5 * ((pred - y) ** 2).mean()


NOT_A_LOSS = (0.5, 2.0)  # a value, not a function: model.loss refuses it
