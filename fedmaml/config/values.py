"""One key's value: converted to the key's type and checked against its choices and range.

Each problem is a ``key.path: message`` string naming the bad value and what is allowed; callers
collect them and report them together. The one parser of list syntax (``a,b``, ``[a, b]``) lives
here: every list-valued key (``compare_with``, ``model.hidden``, ``pattern_selection.candidates``...)
goes through :func:`convert_value` whether it comes from YAML, an override or Flower's run config.
"""

import difflib
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fedmaml.config.schema import MAPPING_KEYS, SPECS, FieldSpec, mapping_entry
from fedmaml.errors import ConfigError


def show(value: Any) -> str:
    """A value as the user wrote it (YAML spelling for null and booleans)."""
    if getattr(value, "yaml_text", None):
        return str(int(value))
    if value is None:
        return "null (empty)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def suggest(word: str, candidates: Sequence[str]) -> str:
    """``; did you mean 'x'?`` for the closest candidate, or nothing when none is close."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # bool is an int subclass: never accept it


def convert_value(spec: FieldSpec, value: Any, problems: list[str]) -> Any:
    """Return ``value`` converted to the field's type, or append a problem and return None."""
    where = spec.path
    if spec.type is bool:
        if not isinstance(value, bool):
            problems.append(f"{where}: expected true or false, got {show(value)}")
            return None
        return value
    if spec.type is str:
        if spec.path in MAPPING_KEYS and isinstance(value, Mapping):
            return _mapping_text(spec.path, value, problems)
        if not isinstance(value, str):
            hint = ""
            if getattr(value, "yaml_text", None):  # 011 -> 9: say what was written
                hint = (f" (YAML read {value.yaml_text} as the number {int(value)}; quote it: "
                        f"'{value.yaml_text}')")
            elif _is_int(value) or isinstance(value, float):
                hint = f" (YAML read it as a number; quote it: '{value}')"
            problems.append(f"{where}: expected a string, got {show(value)}{hint}")
            return None
        if spec.choices is not None and value not in spec.choices:
            problems.append(f"{where}: {value!r} is not allowed; allowed: {', '.join(spec.choices)}"
                            + suggest(value, spec.choices))
            return None
        return value
    if spec.type is int:
        if not _is_int(value):
            problems.append(f"{where}: expected an integer, got {show(value)}")
            return None
        value = int(value)  # a plain int, not YAML's YamlInt
    elif spec.type is float:
        # PyYAML reads 1e-3 (no dot) as a string; accept numeric strings so '1e-3' works everywhere.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
            problems.append(f"{where}: expected a finite number, got {show(value)}")
            return None
        value = float(value)
    elif spec.is_list and spec.item_type is str:
        return _check_str_list(spec, _as_list(value, str), problems)
    elif spec.is_list:
        value = _as_list(value, int)
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}: expected a list of integers such as 40,40 or [40, 40], "
                            f"got {show(value)}")
            return None
        ok = True
        for i, item in enumerate(value):
            if not _is_int(item):
                problems.append(f"{where}[{i}]: expected an integer, got {show(item)}")
                ok = False
            elif not spec.in_range(item):
                problems.append(f"{where}[{i}]: {item} is out of range; allowed: {spec.range_text()}")
                ok = False
        return tuple(int(v) for v in value) if ok else None
    else:  # pragma: no cover - a schema bug, not a user mistake
        raise TypeError(f"unsupported schema type {spec.type!r} for {where}")
    if not spec.in_range(value):
        problems.append(f"{where}: {show(value)} is out of range; allowed: {spec.range_text()}")
        return None
    return value



#: A float with an exponent, with or without a dot, with at least one digit before the exponent:
#: YAML 1.1 (PyYAML) reads ``1e-5`` as text, YAML 1.2 and JSON as a number.
EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")


def exponents_as_numbers(value: Any) -> Any:
    """``value`` with every text that is an exponent float (``'1e-5'``, as YAML 1.1 left it)
    turned into that float, in lists and mappings too. For the entries of a free-form mapping,
    which have no type that would convert them (a typed key converts its own and keeps the text
    for run names); a quoted ``'1e3'`` becomes a number too."""
    if isinstance(value, str) and EXPONENT_FLOAT.match(value.strip()):
        return float(value.replace("_", ""))
    if isinstance(value, dict):
        return {k: exponents_as_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [exponents_as_numbers(v) for v in value]
    return value


def _mapping_text(key: str, value: Mapping[Any, Any], problems: list[str]) -> str | None:
    """A mapping key's value as the JSON text the config keeps (order kept: groups are input side
    first), or a problem naming the entry JSON cannot hold (YAML reads 2024-01-31 as a date)."""
    for name, item in value.items():
        try:
            json.dumps(item)
        except (TypeError, ValueError):
            kind = type(item).__name__
            what, fix = ((f"YAML read {item} as a {kind}", f"quote it: '{item}'")
                         if kind in ("date", "datetime") else
                         (f"{item!r} is a {kind}", "give a number, text, true/false, a list or a "
                          "mapping"))
            problems.append(f"{key}.{name}: {what}, which the config cannot keep ({key} is kept "
                            f"as JSON text); {fix}")
            return None
    return json.dumps(exponents_as_numbers(dict(value)))


def _check_str_list(spec: FieldSpec, value: Any, problems: list[str]) -> Any:
    """A list of distinct strings, each among the field's choices (when it has some)."""
    where, example = spec.path, (spec.choices or ("a", "b"))[:2]
    if not isinstance(value, (list, tuple)):
        problems.append(f"{where}: expected a list such as {','.join(example)} or "
                        f"[{', '.join(example)}], got {show(value)}")
        return None
    ok = True
    for i, item in enumerate(value):
        if not isinstance(item, str):
            problems.append(f"{where}[{i}]: expected a string, got {show(item)}")
            ok = False
        elif spec.choices is not None and item not in spec.choices:
            problems.append(f"{where}[{i}]: {item!r} is not allowed; allowed: "
                            f"{', '.join(spec.choices)}" + suggest(item, spec.choices))
            ok = False
        elif spec.choices is not None and item in value[:i]:
            problems.append(f"{where}[{i}]: {item!r} appears twice")
            ok = False
    return tuple(value) if ok else None


def _as_list(value: Any, item_type: type) -> Any:
    """One list syntax everywhere, parsed here only: a list key takes ``[a, b]`` (YAML), the text
    ``a,b`` (the command line, Flower's run config, whose values are scalars) or ``[a,b]`` as
    text, and a single item ``a`` as ``[a]``; empty text is the empty list. Items of a list of
    strings stay text as written (a pattern ``0001`` is not the number 1). Other values (true,
    0.5, a mapping) are left for the type check to refuse."""
    if isinstance(value, str):
        return _parse_list(value, item_type)
    if _is_int(value):
        value = [value]
    if item_type is str and isinstance(value, (list, tuple)):
        # YAML reads [0001, 11111] as numbers: take them back as written
        return [getattr(v, "yaml_text", None) or str(v) if _is_int(v) else v for v in value]
    return value


def _parse_list(text: str, item_type: type) -> list[Any]:
    """"40,40" or "[40, 40]" -> [40, 40]; "a, b" or "['a', b]" -> ["a", "b"]; "" -> []. For an
    integer list, items that are not integers stay strings, for the type check of the key."""
    text = text.strip().removeprefix("[").removesuffix("]").strip()
    if not text:
        return []
    items: list[Any] = []
    for part in text.split(","):
        part = part.strip()
        if len(part) >= 2 and part[0] == part[-1] and part[0] in "'\"":
            part = part[1:-1]  # [a, 'b'] as text: quoted as YAML would allow
        elif not part:  # "a,b," or "a,,b": no item between the commas
            continue
        if item_type is int:
            try:
                items.append(int(part))
                continue
            except ValueError:
                pass
        items.append(part)
    return items


def check_value(path: str, value: Any) -> None:
    """Raise the ConfigError of ``value`` for key ``path`` on its own (type, choices, range), without
    the rules linking several keys."""
    problems: list[str] = []
    entry = mapping_entry(path)
    if entry is not None:  # algorithm.kwargs.lam: free-form, but kept as JSON text
        convert_value(SPECS[entry[0]], {entry[1]: value}, problems)
    else:
        convert_value(SPECS[path], value, problems)
    if problems:
        raise ConfigError(problems[0])
