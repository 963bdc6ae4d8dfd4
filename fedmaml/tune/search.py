"""Search strategies that propose points of a space in batches: ``ask(n)`` points, train them as one
computation, then ``tell`` what came out (docs/tuning.md).

* ``grid``: every point of the space's grid, in order;
* ``random``: points drawn independently (seeded; the draw depends only on the seed and on how many
  points were asked before, so a resumed tuning run draws the same ones);
* ``tpe``: Optuna's TPE sampler (the optional extra ``fedmaml[tune]``), rebuilt at each ask from
  every result told so far.

The tuner keeps the points it asked in its ledger before training them, so a search never has to
reproduce an ask after a restart; ``tell`` only feeds what later asks learn from.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedmaml.errors import ConfigError
from fedmaml.tune.space import Dimension, Space, round_sig

SEARCHES = ("grid", "random", "tpe")
#: How many times a random search redraws a point that was asked already before giving up.
_REDRAWS = 100


class Search:
    """Base: remembers the points asked (in order) and the results told."""

    def __init__(self, space: Space, direction: str, seed: int) -> None:
        self.space, self.direction, self.seed = space, direction, seed
        self.asked: list[dict[str, Any]] = []
        self.told: list[tuple[dict[str, Any], float | None, str, dict[int, float]]] = []

    def exhausted(self) -> bool:
        return False

    def ask(self, n: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def note_asked(self, params: dict[str, Any]) -> None:
        """A point asked in an earlier invocation (from the ledger)."""
        self.asked.append(params)

    def tell(self, params: dict[str, Any], value: float | None, state: str,
             rung_values: dict[int, float] | None = None) -> None:
        """``state``: complete (``value`` is its score), pruned (stopped at a rung;
        ``rung_values``: round -> score), or fail (diverged, or excluded)."""
        self.told.append((params, value, state, dict(rung_values or {})))


class GridSearch(Search):
    def __init__(self, space: Space, direction: str, seed: int, points: int) -> None:
        super().__init__(space, direction, seed)
        self.points = space.grid(points)

    def size(self) -> int:
        return len(self.points)

    def exhausted(self) -> bool:
        return len(self.asked) >= len(self.points)

    def ask(self, n: int) -> list[dict[str, Any]]:
        start = len(self.asked)
        out = self.points[start:start + n]
        self.asked += out
        return out


class RandomSearch(Search):
    def ask(self, n: int) -> list[dict[str, Any]]:
        out = []
        seen = {_key(p) for p in self.asked}
        for _ in range(n):
            rng = np.random.default_rng([self.seed, len(self.asked)])
            for _ in range(_REDRAWS):
                p = self.space.sample(rng)
                if _key(p) not in seen:
                    break
            else:
                return out  # the space holds no more distinct points (small choice lists)
            seen.add(_key(p))
            self.asked.append(p)
            out.append(p)
        return out


class TPESearch(Search):
    """Optuna's TPE, asked ``n`` points at a time from a study rebuilt from every result told."""

    def __init__(self, space: Space, direction: str, seed: int) -> None:
        super().__init__(space, direction, seed)
        self.optuna = require_optuna()

    def _distribution(self, d: Dimension) -> Any:
        dist = self.optuna.distributions
        if d.kind == "choice":  # by index: optuna's categories must be scalars, ours may be lists
            return dist.CategoricalDistribution(list(range(len(d.choices))))
        if d.kind == "int":
            return dist.IntDistribution(int(d.low), int(d.high))
        return dist.FloatDistribution(d.low, d.high, log=d.kind == "log")

    def _internal(self, d: Dimension, value: Any) -> Any:
        return d.choices.index(value) if d.kind == "choice" else value

    def ask(self, n: int) -> list[dict[str, Any]]:
        optuna = self.optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        dists = {d.key: self._distribution(d) for d in self.space.dims}
        # One seed per ask: a resumed tuning run re-asks nothing (the ledger has the points), and
        # the same history asked again gives the same points.
        study = optuna.create_study(
            direction="minimize" if self.direction == "min" else "maximize",
            # constant_liar: points of this ask still training count as bad ones, so one ask of n
            # spreads its points instead of proposing n near-copies
            sampler=optuna.samplers.TPESampler(seed=self.seed * 7919 + len(self.asked),
                                               constant_liar=True))
        for params, value, state, rungs in self.told:
            internal = {d.key: self._internal(d, params[d.key]) for d in self.space.dims}
            if state == "complete" and value is not None and math.isfinite(value):
                trial = optuna.trial.create_trial(params=internal, distributions=dists, value=value)
            elif state == "pruned" and rungs:
                trial = optuna.trial.create_trial(
                    params=internal, distributions=dists, intermediate_values=rungs,
                    state=optuna.trial.TrialState.PRUNED)
            else:
                trial = optuna.trial.create_trial(params=internal, distributions=dists,
                                                  state=optuna.trial.TrialState.FAIL)
            study.add_trial(trial)
        out: list[dict[str, Any]] = []
        seen = {_key(p) for p in self.asked}
        for _ in range(n * _REDRAWS):
            if len(out) == n:
                break
            trial = study.ask(dists)
            p = {d.key: self._external(d, trial.params[d.key]) for d in self.space.dims}
            if _key(p) in seen:
                continue
            seen.add(_key(p))
            out.append(p)
        self.asked += out
        return out

    def _external(self, d: Dimension, v: Any) -> Any:
        if d.kind == "choice":
            return d.choices[int(v)]
        if d.kind == "int":
            return int(v)
        return min(max(round_sig(float(v)), d.low), d.high)


def require_optuna() -> Any:
    """Optuna, or the error that says how to install it."""
    try:
        import optuna
    except ImportError:
        raise ConfigError("--search tpe needs Optuna, which is an optional extra: "
                          "pip install 'fedmaml[tune]' (or pip install optuna); --search random "
                          "and grid need nothing more") from None
    return optuna


def _key(params: dict[str, Any]) -> str:
    return repr(sorted(params.items()))


def make_search(name: str, space: Space, direction: str, seed: int, grid_points: int) -> Search:
    if name == "grid":
        return GridSearch(space, direction, seed, grid_points)
    if name == "random":
        return RandomSearch(space, direction, seed)
    if name == "tpe":
        return TPESearch(space, direction, seed)
    raise ConfigError(f"--search {name!r}: allowed: {', '.join(SEARCHES)}")
