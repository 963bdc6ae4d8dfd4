"""Robust selection: which candidate a tuning run chooses, and why the others are not chosen
(docs/tuning.md, "How the choice is made").

A candidate is one point of the space trained on every tuning seed. It is **eligible** only when,
on every seed, the run trained the whole budget and completed, its final metric is finite, and its
validation curve does not rise late: the final value is not worse than ``rise`` times the best value
of the curve at or after half the budget (for a metric to maximise: not below that best divided by
``rise``). Among eligible candidates the best mean over seeds wins; the report gives the margin to
the runner-up (and whether it is within the seeds' spread) and flags a choice at the edge of the
space. Pure functions on numbers: no files, no torch.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The default of ``--rise``: a final value 20 % worse than the curve's best after half the budget.
RISE = 1.2


@dataclass
class SeedResult:
    """One run of a candidate: its status (completed, diverged, failed, interrupted: stopped at a
    rung), the rounds it trained, and its metric curve ``[(round, value)]``."""

    seed: int
    status: str
    rounds: int
    curve: list[tuple[int, float]]

    @property
    def final(self) -> float:
        return self.curve[-1][1] if self.curve else math.nan


@dataclass
class Candidate:
    id: int
    params: dict[str, Any]
    runs: list[SeedResult]
    setting: str | None = None
    # filled by judge()
    score: float = math.nan
    spread: float = math.nan
    excluded: str | None = None
    rise: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)


def late_rise(curve: Sequence[tuple[int, float]], budget: int, direction: str) -> float:
    """How much worse the final value is than the best at or after half the budget, as a ratio
    (``final / best`` to minimise, ``best / final`` to maximise; 1.0 = the final is the best)."""
    tail = [v for r, v in curve if r >= budget / 2]
    if not tail:
        return math.nan
    final = curve[-1][1]
    best = min(tail) if direction == "min" else max(tail)
    if direction == "min":
        return final / best if best > 0 else (1.0 if final <= best else math.inf)
    return best / final if final > 0 else (1.0 if final >= best else math.inf)


def judge(c: Candidate, budget: int, direction: str, rise: float = RISE) -> Candidate:
    """Fill ``c``'s score (mean final over seeds), spread (std over seeds), worst late rise, and
    ``excluded``: why it cannot be chosen (None: eligible)."""
    if not c.runs:  # its values make no valid config: it never trained
        c.excluded = str(c.extra.get("invalid", "no runs"))
        return c
    finals = [r.final for r in c.runs]
    c.score = statistics.fmean(finals) if finals and all(map(math.isfinite, finals)) else math.nan
    c.spread = statistics.stdev(finals) if len(finals) > 1 and math.isfinite(c.score) else math.nan
    reasons = []
    for r in c.runs:
        if r.status == "interrupted" and r.rounds < budget:
            reasons.append(f"stopped at round {r.rounds} (successive halving)")
            break
        if r.status != "completed":
            reasons.append(f"{r.status} on seed {r.seed} (after round {r.rounds})")
        elif not math.isfinite(r.final):
            reasons.append(f"metric not finite on seed {r.seed}")
    if not reasons:
        rises = [late_rise(r.curve, budget, direction) for r in c.runs]
        c.rise = max(rises) if all(map(math.isfinite, rises)) else math.nan
        worst = max(range(len(rises)), key=lambda i: rises[i] if math.isfinite(rises[i])
                    else math.inf)
        if not math.isfinite(rises[worst]) or rises[worst] > rise:
            r = c.runs[worst]
            reasons.append(f"rises late on seed {r.seed}: final {r.final:.4g} is "
                           f"{rises[worst]:.2f}x its best after half the budget (limit {rise:g}x)")
    c.excluded = "; ".join(reasons) or None
    return c


@dataclass
class Choice:
    """The outcome of a setting's selection."""

    chosen: Candidate | None
    runner_up: Candidate | None
    ranked: list[Candidate]  # every candidate, eligible ones first (best first)
    edges: dict[str, str]  # key -> lower/upper for a chosen value at the edge of the space
    margin: float = math.nan  # |score(runner-up) - score(chosen)|
    within_noise: bool = False  # the margin is below the larger spread of the two

    @property
    def longest(self) -> Candidate | None:
        """When nothing is eligible, the candidate that trained longest (the most stable of the
        space): what a script may fall back on, saying so; None when there are no candidates."""
        return self.chosen or (self.ranked[0] if self.ranked else None)

    def describe(self) -> str:
        if self.chosen is None:
            return "no candidate is eligible (every one diverged, rose late or was stopped)"
        text = f"chose candidate {self.chosen.id}: " + _params_text(self.chosen.params)
        if self.runner_up is not None:
            text += (f"; runner-up {self.runner_up.id} ({_params_text(self.runner_up.params)}) "
                     f"by {self.margin:.4g}"
                     + (" (within the seeds' spread: not a clear winner)" if self.within_noise
                        else ""))
        if self.edges:
            text += "; AT THE EDGE of the space: " + ", ".join(
                f"{k} at its {e} end" for k, e in self.edges.items()) + " (widen the space)"
        return text


def _params_text(params: Mapping[str, Any]) -> str:
    from fedmaml.config import short_key

    return ", ".join(f"{short_key(k)}={v}" for k, v in params.items())


def choose(candidates: Sequence[Candidate], budget: int, direction: str, rise: float = RISE,
           edges_of: Any = None) -> Choice:
    """Judge every candidate and pick the eligible one with the best mean; ``edges_of(params)``
    gives the edge flags (:meth:`fedmaml.tune.space.Space.edges`)."""
    for c in candidates:
        judge(c, budget, direction, rise)
    sign = 1.0 if direction == "min" else -1.0
    eligible = sorted((c for c in candidates if c.excluded is None), key=lambda c: sign * c.score)
    rest = sorted((c for c in candidates if c.excluded is not None),
                  key=lambda c: (-max((r.rounds for r in c.runs), default=-1),
                                 sign * c.score if math.isfinite(c.score) else math.inf))
    chosen = eligible[0] if eligible else None
    runner = eligible[1] if len(eligible) > 1 else None
    out = Choice(chosen, runner, [*eligible, *rest],
                 edges=dict(edges_of(chosen.params)) if chosen is not None and edges_of else {})
    if chosen is not None and runner is not None:
        out.margin = abs(runner.score - chosen.score)
        spreads = [s for s in (chosen.spread, runner.spread) if math.isfinite(s)]
        out.within_noise = bool(spreads) and out.margin < max(spreads)
    return out
