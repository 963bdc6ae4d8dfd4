"""A sweep's specification and its manifest reader: the grid of config values and the seeds.

``fedmaml sweep`` (fedmaml/sweep.py) plans and runs a sweep from a :class:`SweepSpec`; it writes the
base config and the ``sweep:`` section into ``<sweep dir>/sweep.yaml`` (:data:`MANIFEST`).
Experiment tracking reads that manifest back to tell a run's hyperparameters (the grid keys) from
the rest of its config. Both use this module, which imports only the config: the reader sits below
tracking, and tracking never imports the sweep that runs experiments.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmaml.config import (SWEEP_SECTION, Config, load_config_and_sweep, parse_override,
                            resolve_key)
from fedmaml.errors import ConfigError

MANIFEST = "sweep.yaml"
# Keys a sweep sets itself: the run's identity and place, not part of its setting.
_RESERVED = {"seed": "use --seeds (or sweep.seeds) for seeds",
             "name": "each run is named after its grid values",
             "output_dir": "runs go under the sweep directory (--sweep-dir)"}


@dataclass(frozen=True)
class SweepSpec:
    """What varies: full dotted key -> the values it takes (in the given order), and the seeds."""

    grid: dict[str, tuple[Any, ...]]
    seeds: tuple[int, ...]

    @property
    def num_settings(self) -> int:
        return math.prod(len(v) for v in self.grid.values())



# --------------------------------------------------------------------------------------------------
# Parsing the grid and the seeds
# --------------------------------------------------------------------------------------------------

def split_values(text: str) -> list[str]:
    """Split ``0.3,0.5`` at commas outside brackets, so ``[40,40],[20]`` is two values."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    parts.append(current.strip())
    return parts


def parse_grid_arg(text: str) -> tuple[str, tuple[Any, ...]]:
    """``--grid beta=0.3,0.5`` -> ``("algorithm.beta", (0.3, 0.5))``; values are read as overrides."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise ConfigError(f"--grid {text!r} must look like key=value1,value2,... "
                          "(e.g. --grid algorithm.beta=0.3,0.5,0.9)")
    texts = split_values(raw)
    if any(t == "" for t in texts):
        raise ConfigError(f"--grid {text!r}: an empty value (two commas in a row, or a trailing one)")
    # Read generically first to pick the key (a suffix may need the values), then as that key's type.
    full = grid_key(key, [parse_override(f"{key}={t}")[1] for t in texts], f"--grid {key}")
    return full, tuple(parse_override(f"{full}={t}")[1] for t in texts)


def grid_key(key: str, values: Sequence[Any], where: str) -> str:
    """The full config key a grid key names (suffixes resolved), refusing the keys a sweep sets."""
    try:
        full = resolve_key(key, values)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if full in _RESERVED:
        raise ConfigError(f"{where}: {full!r} cannot be a grid key; {_RESERVED[full]}")
    return full


def parse_seeds(value: Any, where: str = "--seeds") -> tuple[int, ...]:
    """``"0-4"``, ``"0,2,5"``, ``"0-2,7"``, ``3`` or ``[0, 1]`` -> the distinct seeds, in order."""
    if isinstance(value, bool):
        value = None  # not a seed; reported below
    elif isinstance(value, int):
        value = [value]
    elif isinstance(value, str):
        seeds: list[Any] = []
        for part in value.split(","):
            lo, dash, hi = part.strip().partition("-")
            try:
                if dash:
                    a, b = int(lo), int(hi)
                    if b < a:
                        raise ValueError
                    seeds.extend(range(a, b + 1))
                else:
                    seeds.append(int(lo))
            except ValueError:
                raise ConfigError(f"{where}: {value!r} is not a seed list; write e.g. 0-4, 0,2,5 "
                                  "or 0-2,7") from None
        value = seeds
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)):
        raise ConfigError(f"{where}: {value!r} is not a seed list; write non-negative integers, "
                          "e.g. 0-4, 0,2,5 or [0, 1, 2]")
    if len(set(value)) != len(value):
        dup = next(s for s in value if list(value).count(s) > 1)
        raise ConfigError(f"{where}: seed {dup} appears twice")
    return tuple(value)


def spec_from_section(section: Any, source: str) -> tuple[dict[str, tuple[Any, ...]], Any]:
    """The grid (validated keys, raw values) and the raw seeds of a YAML ``sweep:`` section."""
    where = f"{source}: {SWEEP_SECTION}"
    if section is None:
        return {}, None
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: must be a mapping with grid and seeds, got {section!r}")
    unknown = set(section) - {"grid", "seeds"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(map(str, unknown))[0]}: unknown key; allowed keys: "
                          "grid, seeds")
    grid_in = section.get("grid") or {}
    if not isinstance(grid_in, Mapping):
        raise ConfigError(f"{where}.grid: must map keys to lists of values, got {grid_in!r}")
    grid: dict[str, tuple[Any, ...]] = {}
    for key, values in grid_in.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.grid.{key}: expected a non-empty list of values, e.g. "
                              f"[0.3, 0.5], got {values!r}")
        full = grid_key(str(key), values, f"{where}.grid.{key}")
        if full in grid:
            raise ConfigError(f"{where}.grid.{key}: {full} appears twice in the grid")
        grid[full] = tuple(values)
    return grid, section.get("seeds")


def load_sweep(path: str | Path, overrides: Sequence[str] = (), grid_args: Sequence[str] = (),
               seeds: str | None = None) -> tuple[Config, SweepSpec]:
    """The base config and the sweep of a file (its optional ``sweep:`` section), with the CLI's
    ``key=value`` overrides, ``--grid`` arguments (adding to or replacing the file's) and
    ``--seeds``."""
    base, section = load_config_and_sweep(path, overrides)
    grid, file_seeds = spec_from_section(section, str(path))
    cli_keys: set[str] = set()
    for text in grid_args:
        key, values = parse_grid_arg(text)
        if key in cli_keys:
            raise ConfigError(f"--grid {text!r}: {key} is given twice")
        cli_keys.add(key)
        grid[key] = values
    if seeds is not None:
        seed_list = parse_seeds(seeds)
    elif file_seeds is not None:
        seed_list = parse_seeds(file_seeds, f"{path}: {SWEEP_SECTION}.seeds")
    else:
        seed_list = (base.seed,)
    return base, SweepSpec(grid=grid, seeds=seed_list)
