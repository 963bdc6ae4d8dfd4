"""A sweep's specification and its manifest reader: named settings (with the numbers reported
elsewhere for them, :class:`Reference`), the grid of config values and the seeds.

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


#: Per-round training numbers of metrics.jsonl, which ``fedmaml compare`` shows like evaluations.
TRAIN_METRICS = ("loss_before", "loss_after")
#: The parts of an evaluation key ``<group>.<name>.<statistic>`` (``unseen.loss.mean``): the clients
#: it is over and the statistic over them (fedmaml/federated/strategy.py records them).
METRIC_GROUPS = ("seen", "unseen", "sampled", "memory")
METRIC_STATS = ("mean", "p10", "p50", "p90", "std", "max", "fraction", "count", "client", "total")
_METRIC_NAME = re.compile(r"[A-Za-z0-9_-]+")


def metric_key(text: str) -> str:
    """A metric as ``fedmaml compare --metric`` takes it -> its full key: a bare name is of the
    trained clients (``loss`` -> ``seen.loss.mean``), a key without its statistic means the mean
    (``unseen.loss`` -> ``unseen.loss.mean``); full keys and training keys (``loss_after``) are
    kept. Not checked: :func:`check_metric_key`."""
    if text in TRAIN_METRICS:
        return text
    parts = text.split(".")
    if len(parts) == 1:
        parts = ["seen", parts[0], "mean"]
    elif len(parts) == 2:
        parts = [*parts, "mean"]
    return ".".join(parts)


def check_metric_key(value: Any, where: str) -> str:
    """``value`` as a full metric key (:func:`metric_key`), refusing what no run can record."""
    hint = ("write it as `fedmaml compare --metric` takes it: unseen.loss (its mean), "
            "seen.accuracy.p50, loss_after")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a metric key, got {value!r}; {hint}")
    key = metric_key(value)
    if key in TRAIN_METRICS:
        return key
    parts = key.split(".")
    if len(parts) != 3 or not all(_METRIC_NAME.fullmatch(p) for p in parts):
        raise ConfigError(f"{where}: {value!r} is not a metric key; {hint}")
    group, _, stat = parts
    if group not in METRIC_GROUPS:
        raise ConfigError(f"{where}: {value!r}: no metric is over {group!r} clients; "
                          f"allowed: {', '.join(METRIC_GROUPS)} (or {', '.join(TRAIN_METRICS)})")
    if stat not in METRIC_STATS:
        raise ConfigError(f"{where}: {value!r}: {stat!r} is not a statistic that runs record; "
                          f"allowed: {', '.join(METRIC_STATS)}")
    return key


@dataclass(frozen=True)
class Reference:
    """A number reported elsewhere for a named setting (``sweep.references``), shown beside its row
    by ``fedmaml compare`` when the compared metric is the one it is a value of.

    ``text``: the number with its budget and source (``"1.330 ± 0.083 at 5,000 steps (3 seeds): the
    paper's public code"``). ``metric``: the full key of the metric it is a value of
    (``unseen.loss.mean``); "" for a reference written as text alone, which does not say, and is
    then shown beside no metric. ``rounds``: the ``federated.rounds`` of runs trained to the budget
    (or budgets) the text states, in the runs' own rounds (LocalMOML's 5,000 steps of the public
    code are 714 rounds of 5 local steps); compare notes a setting trained another number. Empty:
    not stated."""

    text: str
    metric: str = ""
    rounds: tuple[int, ...] = ()

    def manifest_value(self) -> str | dict[str, Any]:
        """As ``sweep.yaml`` writes it: the text alone when that is all there is."""
        if not self.metric and not self.rounds:
            return self.text
        out: dict[str, Any] = {"text": self.text}
        if self.metric:
            out["metric"] = self.metric
        if self.rounds:
            out["rounds"] = list(self.rounds)
        return out


@dataclass(frozen=True)
class SweepSpec:
    """What varies: named override sets (``settings``: name -> full dotted key -> value, in the given
    order; none: the base config alone), crossed with the grid (full dotted key -> the values it
    takes) and the seeds. ``references``: a setting's name -> a number reported elsewhere for it
    (shown beside its row by ``fedmaml compare``, :class:`Reference`)."""

    grid: dict[str, tuple[Any, ...]]
    seeds: tuple[int, ...]
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    references: dict[str, Reference] = field(default_factory=dict)

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


_REFERENCE_KEYS = ("text", "metric", "rounds")


def parse_references(value: Any, settings: Mapping[str, Any], where: str) -> dict[str, Reference]:
    """``sweep.references``: setting name -> a number reported elsewhere for that setting. Each is
    a mapping ``{text: "1.330 ± 0.083 at 5,000 steps (3 seeds): the paper's public code", metric:
    unseen.loss, rounds: 5000}`` (``metric`` as ``fedmaml compare --metric`` takes it; ``rounds``:
    one number or a list, one per budget the text states), or the text alone, which says neither
    (``fedmaml compare`` then shows it beside no metric, and says so)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: must map setting names to references, got {value!r}")
    out = {}
    for name, ref in value.items():
        here = f"{where}.{name}"
        if name not in settings:
            raise ConfigError(f"{here}: no setting of that name; settings: "
                              + (", ".join(settings) or "none (sweep.settings is empty)"))
        if not isinstance(ref, Mapping):
            ref = {"text": ref}
        unknown = [str(k) for k in ref if k not in _REFERENCE_KEYS]
        if unknown:
            raise ConfigError(f"{here}.{unknown[0]}: unknown key; allowed keys: "
                              + ", ".join(_REFERENCE_KEYS))
        text = ref.get("text")
        if not isinstance(text, (str, int, float)) or isinstance(text, bool) or str(text) == "":
            raise ConfigError(f"{here}{'.text' if 'text' in ref else ''}: must be a number or "
                              f"text, got {text!r}"
                              + ("" if "text" in ref else "; a reference with `metric` or `rounds` "
                                 "says its number in `text`"))
        metric = check_metric_key(ref["metric"], f"{here}.metric") if "metric" in ref else ""
        rounds = ref.get("rounds", [])
        rounds = [rounds] if isinstance(rounds, int) and not isinstance(rounds, bool) else rounds
        if (not isinstance(rounds, list) or (not rounds and "rounds" in ref)
                or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1
                           for r in rounds)):
            raise ConfigError(f"{here}.rounds: expected the federated.rounds of the budget the "
                              "reference states, a positive integer or a list of them (one per "
                              f"budget), got {ref.get('rounds')!r}")
        if len(set(rounds)) != len(rounds):
            raise ConfigError(f"{here}.rounds: {ref.get('rounds')!r} names a number twice")
        out[str(name)] = Reference(str(text), metric, tuple(rounds))
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
                          ) -> tuple[dict[str, dict[str, Any]], dict[str, Reference]]:
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
                    "which replaces a key=value override in its runs; change it in the setting "
                    "instead")


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
