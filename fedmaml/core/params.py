"""Parameters as ordered ``name -> tensor`` dicts, and the few arithmetic helpers the algorithms need.

All helpers are out-of-place, so they are safe inside ``torch.func`` transforms and never modify
a caller's tensors.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

Params = dict[str, Tensor]


def detach(p: Params) -> Params:
    return {k: v.detach() for k, v in p.items()}


def clone(p: Params) -> Params:
    return {k: v.detach().clone() for k, v in p.items()}


def add(a: Params, b: Params, scale: float | Tensor = 1.0) -> Params:
    """``a + scale * b``."""
    return {k: a[k] + scale * b[k] for k in a}


def sub(a: Params, b: Params) -> Params:
    return {k: a[k] - b[k] for k in a}


def scale(a: Params, s: float | Tensor) -> Params:
    return {k: s * v for k, v in a.items()}


def lerp(a: Params, b: Params, weight: float | Tensor) -> Params:
    """``(1 - weight) * a + weight * b``; ``weight = 1`` returns ``b``'s values exactly."""
    if isinstance(weight, (int, float)) and weight == 1:
        return dict(b)
    return {k: torch.lerp(a[k], b[k], weight) for k in a}  # one fused op instead of three


def mean(ps: list[Params], weights: Iterable[float] | None = None) -> Params:
    """Weighted (or plain) mean of several parameter dicts."""
    if not ps:
        raise ValueError("mean of no parameter dicts")
    if len(ps) == 1 and weights is None:  # exactly ps[0]; skips three passes over the tensors
        return dict(ps[0])
    w = [1.0] * len(ps) if weights is None else [float(x) for x in weights]
    total = sum(w)
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {w}")
    return {k: sum(wi * p[k] for wi, p in zip(w, ps)) / total for k in ps[0]}


def stack(ps: list[Params]) -> Params:
    return {k: torch.stack([p[k] for p in ps]) for k in ps[0]}


def unstack(p: Params) -> list[Params]:
    n = len(next(iter(p.values())))
    return [{k: v[i] for k, v in p.items()} for i in range(n)]


def dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def norm(a: Params) -> Tensor:
    return torch.sqrt(dot(a, a))


def num_bytes(p: Params) -> int:
    return sum(v.numel() * v.element_size() for v in p.values())


def finite_rows(params: Params, lead: int) -> torch.Tensor:
    """Bool over the ``lead`` leading axes of ``params`` (``[R]`` of runs ``[R, ...]``, ``[R, C]``
    of rows ``[R, C, ...]``): is every value of each row finite? (One sum per parameter and row
    first: when the sums are finite, so is every value, which spares the element-wise check.)"""
    shape = next(iter(params.values())).shape[:lead]
    # -1 is ambiguous when there is no row (a round without updates): then any size fits
    rest = -1 if math.prod(shape) else 0
    flat = [v.reshape(*shape, rest) for v in params.values()]
    ok = torch.isfinite(torch.stack([v.sum(-1) for v in flat])).all(0)  # [P, *lead] -> lead
    if bool(ok.all()):
        return ok
    return torch.stack([torch.isfinite(v).all(-1) for v in flat]).all(0)
