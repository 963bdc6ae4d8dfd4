"""Server side: averaging client updates and the server optimizer (step 4 of
docs/algorithms.md#federated-localmoml).

``w_{r+1} = w_r + server_lr * avg(delta)`` for SGD; momentum and Adam treat ``-avg(delta)`` as a
gradient (FedAvgM, FedAdam). The optimizer state is a dict of tensors so it can be checkpointed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedmaml.core.params import Params

AGGREGATE_CHUNK = 256  # updates stacked at a time


def aggregate(deltas: list[Params], num_examples: list[int], weighting: str) -> Params:
    """Mean of client updates, ``weighted`` by example counts or ``uniform``."""
    if not deltas:
        raise ValueError("mean of no parameter dicts")
    weights, total = _weights(num_examples, weighting)
    # One weighted sum per parameter over stacked updates (in chunks, to bound the extra memory):
    # with hundreds of clients a round, two tiny tensor ops per client and parameter cost more.
    out = {}
    for k, first in deltas[0].items():
        coef = torch.tensor([weights], dtype=first.dtype, device=first.device)
        acc = None
        for at in range(0, len(deltas), AGGREGATE_CHUNK):
            part = _weighted_rows(coef[:, at:at + AGGREGATE_CHUNK],
                                  torch.stack([d[k] for d in deltas[at:at + AGGREGATE_CHUNK]]))
            acc = part if acc is None else acc + part
        out[k] = acc / total
    return out


def aggregate_stacked(stacked: Params, num_examples: list[int], weighting: str) -> Params:
    """:func:`aggregate` of updates already stacked along a leading client axis (``[n, ...]``):
    the same sums in the same chunks, so the same numbers to the last bit."""
    if not stacked or not len(next(iter(stacked.values()))):
        raise ValueError("mean of no parameter dicts")
    weights, total = _weights(num_examples, weighting)
    return {k: v / total for k, v in weighted_sum_stacked(stacked, weights).items()}


def weighted_sum_stacked(stacked: Params, weights: list[float]) -> Params:
    """``sum_j weights[j] * stacked[j]`` per parameter, in chunks of :data:`AGGREGATE_CHUNK` rows:
    the numerator of :func:`aggregate_stacked`. A part of the rows (a shard's) summed here and the
    parts added give the mean over all rows to float rounding; one part gives it to the bit."""
    coefs: dict[tuple, torch.Tensor] = {}  # per dtype and device: the weights as a row [1, n]
    out = {}
    for k, v in stacked.items():
        coef = coefs.get((v.dtype, v.device))
        if coef is None:
            coef = coefs[(v.dtype, v.device)] = torch.tensor([weights], dtype=v.dtype,
                                                             device=v.device)
        n = v.shape[0]
        if n <= AGGREGATE_CHUNK:
            out[k] = _weighted_rows(coef, v)
            continue
        acc = _weighted_rows(coef[:, :AGGREGATE_CHUNK], v[:AGGREGATE_CHUNK])
        for at in range(AGGREGATE_CHUNK, n, AGGREGATE_CHUNK):
            acc = acc + _weighted_rows(coef[:, at:at + AGGREGATE_CHUNK], v[at:at + AGGREGATE_CHUNK])
        out[k] = acc
    return out


def _weighted_rows(coef: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``sum_j coef[0, j] * rows[j]`` (``coef``: the weights as a row ``[1, n]``): the product
    ``torch.tensordot(coef[0], rows, dims=1)`` computes (a dot product for rows of one value, else
    ``[1, n] @ [n, size]``), to the bit, without its Python wrapper (a few microseconds a call,
    which a small model's round pays for every parameter)."""
    shape = rows.shape
    flat = rows.reshape(shape[0], -1)
    if flat.shape[1] == 1:
        return torch.dot(coef[0], flat[:, 0]).reshape(shape[1:])
    return coef.mm(flat).view(shape[1:])


def mean_weights(num_examples: list[int], weighting: str) -> list[float]:
    """Each update's weight in the mean: its example count (``weighted``) or 1 (``uniform``)."""
    if weighting not in ("weighted", "uniform"):
        raise ValueError(f"aggregation must be 'weighted' or 'uniform', got {weighting!r}")
    return [float(n) for n in num_examples] if weighting == "weighted" else [1.0] * len(num_examples)


def _weights(num_examples: list[int], weighting: str) -> tuple[list[float], float]:
    weights = mean_weights(num_examples, weighting)
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {weights}")
    return weights, total


@dataclass
class ServerOptimizer:
    """The server optimizer. ``lr`` and ``steps`` may be tensors ``[R]`` when ``w`` stacks ``R`` runs
    along a leading axis (a vectorized sweep, fedmaml/engines/run_batch.py): each run then steps
    with its own rate and bias correction, by the same formulas."""

    kind: str = "sgd"
    lr: float | torch.Tensor = 1.0
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int | torch.Tensor = 0

    def __post_init__(self) -> None:
        if self.kind not in ("sgd", "momentum", "adam"):
            raise ValueError(f"server optimizer must be sgd, momentum or adam, got {self.kind!r}")

    def step(self, w: Params, delta: Params) -> Params:
        self.steps += 1
        lr = lambda k: per_run(self.lr, w[k])  # noqa: E731
        if self.kind == "sgd":
            if not isinstance(self.lr, torch.Tensor) and self.lr == 1:  # 1 * x is x, to the bit
                return {k: w[k] + delta[k] for k in w}
            return {k: w[k] + lr(k) * delta[k] for k in w}
        if self.kind == "momentum":
            for k in w:
                self.state[f"m.{k}"] = self.momentum * self.state.get(f"m.{k}", 0) + delta[k]
            return {k: w[k] + lr(k) * self.state[f"m.{k}"] for k in w}
        b1, b2 = self.betas
        out = {}
        for k in w:
            m = b1 * self.state.get(f"m.{k}", 0) + (1 - b1) * delta[k]
            v = b2 * self.state.get(f"v.{k}", 0) + (1 - b2) * delta[k] ** 2
            self.state[f"m.{k}"], self.state[f"v.{k}"] = m, v
            m_hat = m / per_run(1 - b1 ** self.steps, w[k])
            v_hat = v / per_run(1 - b2 ** self.steps, w[k])
            out[k] = w[k] + lr(k) * m_hat / (v_hat.sqrt() + self.eps)
        return out


def per_run(value: float | int | torch.Tensor, like: torch.Tensor) -> float | int | torch.Tensor:
    """``value`` as is, or a tensor ``[R]`` shaped ``[R, 1, ...]`` (in ``like``'s dtype when
    floating) to broadcast over ``like``'s per-run parameter (``like``: ``[R, ...]``)."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if value.is_floating_point():
        value = value.to(like.dtype)
    return value.reshape(-1, *([1] * (like.dim() - 1)))
