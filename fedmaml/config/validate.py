"""A :class:`Config` from a nested dict: every field checked, then the cross-field rules; and back.

Every user mistake raises :class:`~fedmaml.errors.ConfigError` naming the full key path, the bad
value and what is allowed. Field-level problems are collected and reported together; cross-field
rules (fedmaml/config/rules.py) run only once every field is individually valid.
"""

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from fedmaml.config.rules import cross_field_problems
from fedmaml.config.schema import SPECS, Config
from fedmaml.config.values import convert_value, show, suggest
from fedmaml.errors import ConfigError


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, appending every problem found."""
    if data is None:  # "data:" with nothing under it is an empty section
        data = {}
    if not isinstance(data, Mapping):
        what = f"section {prefix[:-1]!r}" if prefix else "the configuration"
        problems.append(f"{prefix[:-1] or '(top level)'}: {what} must be a mapping of keys, "
                        f"got {show(data)}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if not isinstance(key, str) or key not in fields:
            known = sorted(fields)
            hint = suggest(str(key), known) or f"; allowed keys: {', '.join(known)}"
            problems.append(f"{prefix}{key!s}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        if dataclasses.is_dataclass(f.type):
            kwargs[name] = _build(typing.cast(type, f.type), data[name], prefix + name + ".",
                                  problems)
        else:
            kwargs[name] = convert_value(SPECS[prefix + name], data[name], problems)
    return None if problems else cls(**kwargs)


def _raise(source: str, problems: list[str]) -> None:
    if len(problems) == 1:
        raise ConfigError(f"{source}: {problems[0]}")
    listing = "\n".join(f"  - {p}" for p in problems)
    raise ConfigError(f"{source}: {len(problems)} problems:\n{listing}")


def config_from_dict(d: Mapping[str, Any], *, source: str = "config") -> Config:
    """Validate a nested dict (missing keys take their defaults) and build a :class:`Config`.

    ``source`` names where the dict came from in error messages (a file name, "overrides"...).
    """
    problems: list[str] = []
    cfg: Config = _build(Config, d, "", problems)
    if not problems:
        problems = cross_field_problems(cfg)
    if problems:
        _raise(source, problems)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """A plain nested dict (lists, not tuples) that :func:`config_from_dict` turns back into ``cfg``."""
    return _as_dict(cfg)


def _as_dict(obj: Any) -> dict[str, Any]:
    """A config or one of its sections as a plain nested dict."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = _as_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out
