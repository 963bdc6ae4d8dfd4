"""A sweep's specification and its manifest reader: named settings, the grid of config values and
the seeds.

``fedmaml sweep`` (fedmaml/sweep.py) plans and runs a sweep from a :class:`SweepSpec`; it writes the
base config and the ``sweep:`` section into ``<sweep dir>/sweep.yaml`` (:data:`MANIFEST`).
Experiment tracking reads that manifest back to tell a run's hyperparameters (the grid keys) from
the rest of its config (the grid keys and the keys its named settings set). Both use this module, which imports only the config: the reader sits below
tracking, and tracking never imports the sweep that runs experiments.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmaml.config import (SWEEP_SECTION, Config, check_value, load_config_and_sweep,
                            parse_override, resolve_key)
from fedmaml.errors import ConfigError

MANIFEST = "sweep.yaml"
# Keys a sweep sets itself: the run's identity and place, not part of its setting.
_RESERVED = {"seed": "use --seeds (or sweep.seeds) for seeds",
             "name": "each run is named after its grid values",
             "output_dir": "runs go under the sweep directory (--sweep-dir)"}


@dataclass(frozen=True)
class SweepSpec:
    """What varies: named override sets (``settings``: name -> full dotted key -> value, in the given
    order; none: the base config alone), crossed with the grid (full dotted key -> the values it
    takes) and the seeds. ``references``: a setting's name -> a number reported elsewhere for it
    (shown beside its row by ``fedmaml compare``)."""

    grid: dict[str, tuple[Any, ...]]
    seeds: tuple[int, ...]
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    references: dict[str, str] = field(default_factory=dict)

    @property
    def num_settings(self) -> int:
        return max(1, len(self.settings)) * math.prod(len(v) for v in self.grid.values())


def strip_source(e: ConfigError) -> str:
    """ConfigError texts start with "config: "; inside a sweep message that is noise."""
    return re.sub(r"^config: ", "", str(e))


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


def parse_grid_arg(text: str, flag: str = "--grid") -> tuple[str, tuple[Any, ...]]:
    """``--grid beta=0.3,0.5`` -> ``("algorithm.beta", (0.3, 0.5))``; values are read as overrides.
    ``flag``: the option the errors name (``--space`` lists values as ``--grid`` does)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise ConfigError(f"{flag} {text!r} must look like key=value1,value2,... "
                          f"(e.g. {flag} algorithm.beta=0.3,0.5,0.9)")
    texts = split_values(raw)
    if any(t == "" for t in texts):
        raise ConfigError(f"{flag} {text!r}: an empty value (two commas in a row, or a trailing one)")
    # Read generically first to pick the key (a suffix may need the values), then as that key's type.
    full = grid_key(key, [parse_override(f"{key}={t}")[1] for t in texts], f"{flag} {key}")
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


def overlapping(a: str, b: str) -> str | None:
    """The key that full keys ``a`` and ``b`` both set (``algorithm.kwargs`` for it and its entry
    ``algorithm.kwargs.lam``), or None: a setting or a grid that set both would leave the result to
    the order in which they are applied."""
    if a == b or b.startswith(a + "."):
        return a
    return b if a.startswith(b + ".") else None


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


#: A setting's name is a run directory's first part: letters, digits and ``._+-``, no ``=`` or ``,``
#: (which separate the grid values in the name), not starting with ``.`` or ``-``.
_SETTING_NAME = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9._+-]*")
_MAX_SETTING_NAME = 40
_SECTION_KEYS = ("settings", "references", "grid", "seeds")


def parse_settings(value: Any, where: str) -> dict[str, dict[str, Any]]:
    """``sweep.settings``: named override sets, as a mapping ``{MOML: {algorithm.name: moml, ...}}``
    or a list of one-entry mappings ``[{MOML: {...}}, {FO-MAML: {...}}]`` -> name -> full key ->
    value, in the given order. Names must be safe as directory names and distinct; keys are config
    keys (or unambiguous suffixes, as in the grid) and each value must be valid for its key."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list):
        items = []
        for i, entry in enumerate(value):
            if not isinstance(entry, Mapping) or len(entry) != 1:
                raise ConfigError(f"{where}[{i}]: each entry must be one `NAME: {{key: value, ...}}`"
                                  f" mapping, got {entry!r}")
            items += list(entry.items())
    else:
        raise ConfigError(f"{where}: must map setting names to override sets, e.g. "
                          "{MOML: {algorithm.name: moml}, FO-MAML: {algorithm.name: fedmeta}}, "
                          f"got {value!r}")
    if not items:
        raise ConfigError(f"{where}: is empty; name at least one setting, or leave it out")
    settings: dict[str, dict[str, Any]] = {}
    for name, overrides in items:
        if not isinstance(name, str) or not _SETTING_NAME.fullmatch(name) \
                or len(name) > _MAX_SETTING_NAME:
            raise ConfigError(f"{where}: setting name {name!r} is not allowed; a name becomes a "
                              f"run directory's name: up to {_MAX_SETTING_NAME} letters, digits and "
                              "._+- (no spaces, '=' or ','), not starting with '.' or '-'")
        if name in settings:
            raise ConfigError(f"{where}: setting {name!r} appears twice")
        clash = next((n for n in settings if n.lower() == name.lower()), None)
        if clash is not None:  # one directory on case-insensitive file systems (macOS, Windows)
            raise ConfigError(f"{where}: settings {clash!r} and {name!r} differ only in case; "
                              "their run directories would collide on some file systems")
        if overrides is None:
            overrides = {}  # `base:` alone: the base config itself
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"{where}.{name}: must map config keys to values, e.g. "
                              f"{{algorithm.eta: 0.005}}, got {overrides!r}")
        resolved: dict[str, Any] = {}
        for key, v in overrides.items():
            full = grid_key(str(key), [v], f"{where}.{name}.{key}")
            if full in resolved:
                raise ConfigError(f"{where}.{name}.{key}: {full} is set twice in this setting")
            for other in resolved:
                if (both := overlapping(full, other)) is not None:
                    raise ConfigError(f"{where}.{name}.{key}: {full} and {other} both set {both} "
                                      "in this setting; set it in one place")
            try:
                check_value(full, v)
            except ConfigError as e:
                raise ConfigError(f"{where}.{name}: {strip_source(e)}") from None
            resolved[full] = v
        same = next((n for n, o in settings.items() if o == resolved), None)
        if same is not None:
            raise ConfigError(f"{where}: settings {same!r} and {name!r} set the same values; "
                              "remove one of them")
        settings[name] = resolved
    return settings


def parse_references(value: Any, settings: Mapping[str, Any], where: str) -> dict[str, str]:
    """``sweep.references``: setting name -> a number reported elsewhere for that setting, with its
    source (text, e.g. ``"1.330 ± 0.083 at 5,000 steps (3 seeds): the paper's public code"``)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: must map setting names to text, got {value!r}")
    out = {}
    for name, text in value.items():
        if name not in settings:
            raise ConfigError(f"{where}.{name}: no setting of that name; settings: "
                              + (", ".join(settings) or "none (sweep.settings is empty)"))
        if not isinstance(text, (str, int, float)) or isinstance(text, bool) or str(text) == "":
            raise ConfigError(f"{where}.{name}: must be a number or text, got {text!r}")
        out[str(name)] = str(text)
    return out


def spec_from_section(section: Any, source: str) -> tuple[dict[str, tuple[Any, ...]], Any]:
    """The grid (validated keys, raw values) and the raw seeds of a YAML ``sweep:`` section (its
    settings: :func:`settings_from_section`)."""
    where = f"{source}: {SWEEP_SECTION}"
    if section is None:
        return {}, None
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: must be a mapping with settings, grid and seeds, got "
                          f"{section!r}")
    unknown = set(section) - set(_SECTION_KEYS)
    if unknown:
        raise ConfigError(f"{where}.{sorted(map(str, unknown))[0]}: unknown key; allowed keys: "
                          + ", ".join(_SECTION_KEYS))
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


def settings_from_section(section: Any, source: str
                          ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The named settings and their references of a (validated) YAML ``sweep:`` section."""
    if not isinstance(section, Mapping):
        return {}, {}
    where = f"{source}: {SWEEP_SECTION}"
    settings = parse_settings(section.get("settings"), f"{where}.settings")
    return settings, parse_references(section.get("references"), settings, f"{where}.references")


def _check_overrides_reach_runs(overrides: Sequence[str], settings: Mapping[str, Mapping[str, Any]],
                                path: str | Path) -> None:
    """A ``key=value`` override changes the base config, and a named setting's own value of that key
    replaces it in the setting's runs: refuse it rather than let some runs drop it silently."""
    for text in overrides:
        key = parse_override(text)[0]  # a full key: loading the base config refused any other
        for name, values in settings.items():
            hit = next((k for k in values if overlapping(key, k) is not None), None)
            if hit is not None:
                raise ConfigError(
                    f"{text}: setting {name!r} of {path} sets {hit} itself ({values[hit]!r}), "
                    "which replaces a key=value override in its runs; change the value in the "
                    "setting, or vary it with --grid if no setting sets it")


def load_sweep(path: str | Path, overrides: Sequence[str] = (), grid_args: Sequence[str] = (),
               seeds: str | None = None) -> tuple[Config, SweepSpec]:
    """The base config and the sweep of a file (its optional ``sweep:`` section), with the CLI's
    ``key=value`` overrides, ``--grid`` arguments (adding to or replacing the file's) and
    ``--seeds``."""
    base, section = load_config_and_sweep(path, overrides)
    grid, file_seeds = spec_from_section(section, str(path))
    settings, references = settings_from_section(section, str(path))
    _check_overrides_reach_runs(overrides, settings, path)
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
    return base, SweepSpec(grid=grid, seeds=seed_list, settings=settings, references=references)
