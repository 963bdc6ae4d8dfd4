"""A tuning search space: ``--space KEY=SPEC`` parsed into dimensions (docs/tuning.md).

``SPEC`` is ``log:LO:HI`` (log-uniform floats), ``lin:LO:HI`` (uniform floats), ``int:LO:HI``
(integers, both ends included) or a list of values read as ``fedmaml sweep --grid`` reads them
(``0.1,0.3,0.5``; ``[40,40],[20]``). Keys are config keys or unambiguous suffixes (``eta``), as in a
grid. A space knows its grid (``--search grid``), draws random points, and tells whether a value lies
at the edge of its dimension (a choice there means the space may be too narrow).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmaml.config import check_value
from fedmaml.errors import ConfigError
from fedmaml.sweep_spec import grid_key, parse_grid_arg, strip_source

KINDS = ("log", "lin", "int")
#: Sampled floats keep this many significant digits: run directories are named by their values,
#: and a difference in the fifth digit of a step size is noise in any comparison.
SIGNIFICANT = 3
#: A value within this fraction of a range's end (in log space for log ranges) is "at the edge".
EDGE = 0.05


def round_sig(x: float, digits: int = SIGNIFICANT) -> float:
    return float(f"{x:.{digits}g}")


@dataclass(frozen=True)
class Dimension:
    """One key of the space: a range (``kind`` log, lin or int, ``low``..``high``) or a list of
    ``choices`` (``kind`` choice)."""

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()

    def grid(self, points: int) -> tuple[Any, ...]:
        """The values ``--search grid`` tries: the choices, or ``points`` values spread over the
        range (log-spaced for log ranges, rounded to :data:`SIGNIFICANT` digits)."""
        if self.kind == "choice":
            return self.choices
        if self.kind == "int":
            values = np.linspace(self.low, self.high, min(points, int(self.high - self.low) + 1))
            return tuple(dict.fromkeys(int(round(v)) for v in values))
        if self.kind == "log":
            values = np.exp(np.linspace(math.log(self.low), math.log(self.high), points))
        else:
            values = np.linspace(self.low, self.high, points)
        return tuple(dict.fromkeys(round_sig(float(v)) for v in values))

    def sample(self, rng: np.random.Generator) -> Any:
        if self.kind == "choice":
            return self.choices[int(rng.integers(len(self.choices)))]
        if self.kind == "int":
            return int(rng.integers(int(self.low), int(self.high) + 1))
        if self.kind == "log":
            return round_sig(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return round_sig(rng.uniform(self.low, self.high))

    def edge(self, value: Any) -> str | None:
        """``"lower"``/``"upper"`` when ``value`` lies at an end of the dimension (the first or
        last of numeric choices, or within :data:`EDGE` of a range's end), else None."""
        if self.kind == "choice":
            numeric = [c for c in self.choices
                       if isinstance(c, (int, float)) and not isinstance(c, bool)]
            if len(numeric) != len(self.choices) or len(set(numeric)) < 3:
                return None  # no inside to speak of
            return "lower" if value == min(numeric) else "upper" if value == max(numeric) else None
        t = math.log if self.kind == "log" else float
        p = (t(value) - t(self.low)) / (t(self.high) - t(self.low))
        return "lower" if p <= EDGE else "upper" if p >= 1 - EDGE else None

    def describe(self) -> str:
        if self.kind == "choice":
            return ",".join(str(c) for c in self.choices)
        return f"{self.kind}:{self.low:g}:{self.high:g}"

    def to_json(self) -> dict[str, Any]:
        if self.kind == "choice":
            return {"key": self.key, "kind": "choice", "choices": list(self.choices)}
        return {"key": self.key, "kind": self.kind, "low": self.low, "high": self.high}


def parse_space_arg(text: str) -> Dimension:
    """``algorithm.eta=log:1e-3:1e-1`` (or ``lin:``, ``int:``, or ``0.1,0.3``) -> a Dimension."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    where = f"--space {text!r}"
    if not sep or not key or not raw:
        raise ConfigError(f"{where} must look like KEY=log:LO:HI, KEY=lin:LO:HI, KEY=int:LO:HI or "
                          "KEY=V1,V2,... (e.g. --space algorithm.eta=log:1e-3:1e-1)")
    kind, colon, bounds = raw.partition(":")
    if not colon or kind not in KINDS:
        if colon and "," not in raw and kind.isalpha():
            raise ConfigError(f"{where}: unknown range kind {kind!r}; allowed: "
                              f"{', '.join(k + ':LO:HI' for k in KINDS)}, or a list V1,V2,...")
        full, values = parse_grid_arg(f"{key}={raw}", "--space")  # a list, read as --grid reads it
        for value in values:  # refused before anything trains, as --grid's values are
            try:
                check_value(full, value)
            except ConfigError as e:
                raise ConfigError(f"{where}: {strip_source(e)}") from None
        texts = [repr(v) for v in values]  # 0.10 and 0.1 read as one value
        twice = [v for i, v in enumerate(values) if texts[i] in texts[:i]]
        if twice:
            raise ConfigError(f"{where}: {full} lists {', '.join(repr(v) for v in twice)} more "
                              "than once; give each value once")
        return Dimension(full, "choice", choices=tuple(values))
    parts = bounds.split(":")
    if len(parts) != 2:
        raise ConfigError(f"{where}: a {kind} range is {kind}:LO:HI with two bounds, got "
                          f"{bounds!r}")
    try:
        low, high = (int(p) if kind == "int" else float(p) for p in parts)
    except ValueError:
        what = "integers" if kind == "int" else "numbers"
        raise ConfigError(f"{where}: the bounds {parts[0]!r} and {parts[1]!r} must be {what}") \
            from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ConfigError(f"{where}: LO must be below HI (finite), got {low:g} and {high:g}")
    if kind == "log" and low <= 0:
        raise ConfigError(f"{where}: a log range needs LO > 0, got {low:g}; use lin:{low:g}:"
                          f"{high:g} for a range through zero")
    full = grid_key(key, [low, high], f"--space {key}")
    # the midpoint too: a float range of an integer key fails there even with integer bounds
    for value in (low, high, (low + high) / 2 if kind != "int" else low):
        try:
            check_value(full, value)
        except ConfigError as e:
            hint = ("; an integer key takes int:LO:HI" if kind != "int" and "integer" in str(e)
                    else "")
            raise ConfigError(f"{where}: {strip_source(e)}{hint}") from None
    return Dimension(full, kind, float(low), float(high))


@dataclass(frozen=True)
class Space:
    dims: tuple[Dimension, ...]

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dims]

    def grid(self, points: int) -> list[dict[str, Any]]:
        """Every combination of the dimensions' grids, the first key varying slowest."""
        out: list[dict[str, Any]] = [{}]
        for d in self.dims:
            out = [{**p, d.key: v} for p in out for v in d.grid(points)]
        return out

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        return {d.key: d.sample(rng) for d in self.dims}

    def edges(self, params: Mapping[str, Any]) -> dict[str, str]:
        """``{key: "lower"/"upper"}`` for the values of ``params`` at an edge of the space."""
        return {d.key: e for d in self.dims if (e := d.edge(params[d.key])) is not None}

    def to_json(self) -> list[dict[str, Any]]:
        return [d.to_json() for d in self.dims]


def parse_space(args: Sequence[str]) -> Space:
    """The space of several ``--space`` arguments; a key given twice is an error."""
    if not args:
        raise ConfigError("give the search space: at least one --space KEY=SPEC, e.g. "
                          "--space algorithm.eta=log:1e-3:1e-1")
    dims: list[Dimension] = []
    for text in args:
        d = parse_space_arg(text)
        if any(o.key == d.key for o in dims):
            raise ConfigError(f"--space {text!r}: {d.key} is given twice")
        dims.append(d)
    return Space(tuple(dims))
