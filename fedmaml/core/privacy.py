"""Differential privacy of the meta-updates: fixed clipping and the Gaussian mechanism.

Central DP with fixed clipping (DP-FedAvg, McMahan et al. 2018, arXiv:1710.06963; Flower's
``DifferentialPrivacy*FixedClipping``): every client update ``delta_i`` is scaled to L2 norm at
most ``C`` (all its tensors together: ``delta_i * min(1, C / ||delta_i||)``), the clipped updates
are summed, divided by a denominator ``d`` fixed by the configuration (the cohort size ``k``, the
number of silos, or the expected cohort size ``q n`` under Poisson sampling; never the number that
replied, so one client moves the mean by at most ``C / d`` whatever the others do), and Gaussian
noise of standard deviation ``z * C / d`` is added to every coordinate (``z``: the noise
multiplier). Which neighbouring relation that protects is the caller's business
(fedmaml/federated/privacy.py, docs/privacy.md). The noisy mean is what the server optimizer then applies; anything done to it later
(momentum, Adam) is post-processing and keeps the guarantee.

Updates are "stacked": each tensor has a leading client axis ``[n, ...]``, as the server decodes a
round's replies. Nothing here draws from a global RNG: the noise comes from a ``torch.Generator``
the caller seeds, so a run stays a function of its config and seed.
"""

from __future__ import annotations

import math

import torch

from fedmaml.core.params import Params


def update_norms(stacked: Params) -> torch.Tensor:
    """The L2 norm of each client's whole update (all its tensors), shape ``[n]``, in float64."""
    # reshape with an explicit width: -1 is ambiguous for a stack of no update
    squares = [v.reshape(len(v), math.prod(v.shape[1:])).to(torch.float64).square().sum(1)
               for v in stacked.values()]
    return torch.stack(squares).sum(0).sqrt()


def clip_stacked(stacked: Params, clipping_norm: float) -> tuple[Params, torch.Tensor]:
    """Each client's update scaled to norm at most ``clipping_norm``; returns the clipped updates
    and the norms before clipping. Updates already within the bound are returned unchanged."""
    if not clipping_norm > 0:
        raise ValueError(f"clipping norm must be > 0, got {clipping_norm}")
    norms = update_norms(stacked)
    # min(1, C / norm), computed in float64; a zero update keeps its (zero) value.
    scale = torch.clamp(clipping_norm / torch.clamp(norms, min=1e-300), max=1.0)
    clipped = {}
    for k, v in stacked.items():
        s = scale.to(v.dtype).reshape(-1, *([1] * (v.dim() - 1)))
        clipped[k] = v * s
    return clipped, norms


def clip_update(update: Params, clipping_norm: float) -> Params:
    """One client's update clipped to norm at most ``clipping_norm`` (client-side clipping)."""
    clipped, _ = clip_stacked({k: v.unsqueeze(0) for k, v in update.items()}, clipping_norm)
    return {k: v[0] for k, v in clipped.items()}


def noise_std(noise_multiplier: float, clipping_norm: float, denominator: float) -> float:
    """Standard deviation of the noise on the clipped sum divided by ``denominator``."""
    return noise_multiplier * clipping_norm / denominator


def private_mean(stacked: Params, clipping_norm: float, noise_multiplier: float,
                 denominator: float, generator: torch.Generator) -> tuple[Params, torch.Tensor]:
    """Clip every update, sum, divide by ``denominator``, add ``N(0, noise_std^2)`` noise to every
    coordinate. Returns the noisy mean and the norms before clipping. ``stacked`` may have no row
    (nobody answered): the mean is then the noise alone."""
    if not denominator > 0:
        raise ValueError(f"the denominator of the private mean must be > 0, got {denominator}")
    clipped, norms = clip_stacked(stacked, clipping_norm)
    std = noise_std(noise_multiplier, clipping_norm, denominator)
    out = {}
    for k, v in clipped.items():
        mean = v.sum(0) / denominator
        if std > 0:
            noise = torch.randn(mean.shape, generator=generator, dtype=torch.float64,
                                device=generator.device)
            mean = mean + (std * noise).to(mean.dtype).to(mean.device)
        out[k] = mean
    return out, norms


def noise_generator(seed: int, server_round: int) -> torch.Generator:
    """The generator of a round's noise: a function of (seed, round) only."""
    import numpy as np

    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, server_round, 0xD1F]).generate_state(1,
                                                                                         np.uint64)[0]))
    return g
