"""Successive halving: the rungs at which a batch of trials is looked at, and who goes on.

With ``rungs = n`` and reduction factor ``eta``, rung ``i`` (0-based) is at ``rounds / eta^(n-1-i)``
rounds, moved to the evaluation round at or after it (a rung needs a measurement); the last rung is
the whole budget. At a rung below the last, a candidate goes on when its rung score is among the
best ``ceil(m / eta)`` of the ``m`` candidates that reached that rung so far, in this batch and every
earlier one: ASHA's promotion rule (Li et al., 2020), which for a single batch is synchronous
successive halving. A candidate that diverged on any seed, or whose rung score is not finite, never
goes on. Pure functions: no files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from fedmaml.errors import ConfigError


def rungs_for(rounds: int, eval_every: int, rungs: int, reduction: float) -> list[int]:
    """The rounds of the rungs (increasing, the last = ``rounds``); ``rungs <= 1``: ``[rounds]``."""
    if rungs <= 1:
        return [rounds]
    if reduction <= 1:
        raise ConfigError(f"--reduction {reduction:g}: must be above 1 (keep 1/reduction at a rung)")
    if eval_every <= 0:
        raise ConfigError("--rungs needs evaluations during the run to compare trials at a rung: "
                          "federated.eval_every is 0 (only at the end); set it, e.g. "
                          f"federated.eval_every={max(1, rounds // 16)}")
    out = []
    for i in range(rungs - 1):
        r = rounds / reduction ** (rungs - 1 - i)
        r = max(eval_every, math.ceil(r / eval_every) * eval_every)
        if r < rounds and (not out or r > out[-1]):
            out.append(int(r))
    if len(out) != rungs - 1:
        raise ConfigError(f"--rungs {rungs} with --reduction {reduction:g}: the rungs fall on the "
                          f"same evaluation rounds (federated.eval_every={eval_every} of "
                          f"{rounds} rounds gives {out + [rounds]}); use fewer rungs or evaluate "
                          "more often")
    return [*out, rounds]


def promoted(batch: Sequence[int], scores: Mapping[int, float], reduction: float,
             direction: str) -> list[int]:
    """The candidates of ``batch`` that go on from a rung: those among the best
    ``ceil(len(scores) / reduction)`` of ``scores`` (every candidate that reached the rung so far,
    by id; NaN = diverged or not measured, never promoted)."""
    sign = 1.0 if direction == "min" else -1.0
    finite = sorted((i for i, v in scores.items() if math.isfinite(v)),
                    key=lambda i: (sign * scores[i], i))
    keep = set(finite[:max(1, math.ceil(len(scores) / reduction))])
    return [i for i in batch if i in keep]
