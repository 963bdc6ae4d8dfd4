"""A client's simulated compute speed and the round deadline it is judged against.

``participation.speed`` scales a client's train time by a per-client factor (docs/participation.md),
so that under ``federated.round_timeout`` the slow clients are the stragglers. The factor is a pure
function of ``(seed, client id)``, so every engine, process and batch of runs scales a client's
time alike.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedmaml.config import SPEED_MODELS, Config, ParticipationConfig
from fedmaml.data.counter import derive_keys, splitmix64

# The purpose word of the speed keys: far above any round number (round keys use the round).
_SPEED = (1 << 62) | 0x5BEED


def speed_multipliers(spec: ParticipationConfig, seed: int | np.ndarray, cids: Any) -> np.ndarray:
    """Each client's compute-speed multiplier on its simulated train time (``participation.speed``):
    1 for ``uniform``; ``exp(speed_sigma * z)`` for ``lognormal``, with ``z ~ N(0, 1)`` a pure
    function of ``(seed, client id)`` (a counter-based hash, Box-Muller; vectorized over ``cids``).
    With ``seed`` an array ``[R]`` (a batch of runs) and ``cids`` ``[R, C]``: ``[R, C]``."""
    if spec.speed not in SPEED_MODELS:
        raise ValueError(f"participation.speed {spec.speed!r} is not one of "
                         f"{', '.join(SPEED_MODELS)}")
    ids = np.asarray(cids, dtype=np.int64)
    ids = ids if np.ndim(seed) else ids.reshape(-1)
    if spec.speed == "uniform":
        return np.ones(ids.shape)
    keys = derive_keys(seed, ids, _SPEED)
    bits = splitmix64(keys.reshape(-1), 2) >> np.uint64(11)  # 53-bit uniforms
    u1 = (bits[:, 0].astype(np.float64) + 1.0) * 2.0 ** -53  # in (0, 1]: log(u1) is finite
    u2 = bits[:, 1].astype(np.float64) * 2.0 ** -53
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)
    return np.exp(spec.speed_sigma * z).reshape(ids.shape)


def simulated_seconds(spec: ParticipationConfig, seed: int | np.ndarray, cids: Any,
                      measured: float | np.ndarray) -> np.ndarray:
    """Clients' simulated train times: the measured time (each client's, or its share of a batched
    computation) times its speed multiplier."""
    return np.asarray(measured, dtype=np.float64) * speed_multipliers(spec, seed, cids)


def client_seconds(spec: ParticipationConfig, seed: int, cid: int, measured: float) -> float:
    """One client's :func:`simulated_seconds`, as a number: the measured time itself under
    ``speed: uniform`` (a multiplier of 1), without the array work a cohort needs."""
    if spec.speed == "uniform":
        return float(measured)
    return float(simulated_seconds(spec, seed, [cid], measured)[0])


def judged_by_speed(cfg: Config) -> bool:
    """Whether the client itself judges its deadline from a simulated time: only simulated speeds
    (``participation.speed`` other than uniform) with a deadline. A measured time is judged by
    the engine's clock, as a real reply would be."""
    return cfg.participation.speed != "uniform" and cfg.federated.round_timeout > 0


def past_deadline(cfg: Config, seconds: float | np.ndarray, *, clock: bool = False) -> Any:
    """Whether clients whose train time is ``seconds`` miss the round deadline
    ``federated.round_timeout`` (never without one): a bool, or a bool array for an array of times.

    The client judges itself only a simulated time (:func:`judged_by_speed`): a measured one is
    judged by the engine's clock, as a real reply would be. ``clock``: the caller is that clock (an
    engine that judges every train time itself, as a batch of runs does), so any time counts."""
    timeout = cfg.federated.round_timeout
    judged = judged_by_speed(cfg) or (clock and timeout > 0)
    if np.ndim(seconds) == 0:  # one client: no array work
        return judged and float(seconds) > timeout
    return (np.asarray(seconds) > timeout) & judged
