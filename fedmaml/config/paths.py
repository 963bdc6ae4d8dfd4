"""Dotted key paths: ``key.path=value`` overrides, flat (Flower run-config) mappings, validated
replacement of keys, and short names of keys (``beta`` for ``algorithm.beta``). One entry of a
free-form mapping key is a path too: ``algorithm.kwargs.lam=0.1`` sets ``lam`` and keeps the
mapping's other entries."""

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from fedmaml.config.schema import (MAPPING_KEYS, SPECS, Config, FieldSpec, Scalar, mapping_entry,
                                   schema)
from fedmaml.config.validate import config_from_dict, config_to_dict
from fedmaml.config.values import convert_value, show, suggest
from fedmaml.errors import ConfigError
from fedmaml.user_objects import load_mapping_text


def _set_path(d: dict[str, Any], path: str, value: Any) -> None:
    """Set ``d["a"]["b"] = value`` for path "a.b", creating missing sections; an entry of a mapping
    key (``algorithm.kwargs.lam``) sets that one entry and keeps the others."""
    entry = mapping_entry(path)
    if entry is not None:
        key, name = entry
        _set_plain(d, key, {**_mapping_at(d, key, path), name: value})
    else:
        _set_plain(d, path, value)


def _mapping_at(d: Mapping[str, Any], key: str, path: str) -> dict[str, Any]:
    """The mapping that mapping key ``key`` holds in ``d`` (as YAML, or as the JSON text of a
    written config; nothing or empty text: an empty one), for setting its entry ``path``."""
    node: Any = d
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    if node is None or (isinstance(node, str) and not node.strip()):
        return {}
    value = node
    if isinstance(node, str):
        try:
            value = load_mapping_text(node)
        except yaml.YAMLError:
            pass
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: is {show(value)}, not a mapping, so {path!r} cannot be set; "
                          f"give {key} as a mapping such as {{name: value}}")
    return dict(value)


def _set_plain(d: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = d
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parents[:i + 1])}: is a value ({show(child)}), not a "
                              f"section, so {path!r} cannot be set")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key.path=value`` and parse the value as YAML (``[40,40]``, ``true``, ``1e-3``...).

    String keys take the text as written when YAML would read it as something else, so that
    ``evaluation.pattern=0001`` stays the string "0001" rather than the integer 1.
    """
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key.path=value, "
                          f"e.g. algorithm.beta=0.5")
    if raw == "":
        return key, ""
    spec = SPECS.get(key)
    try:
        # 1e-3 stays text here (YAML 1.1), as written for run names: a typed key converts it, a
        # mapping's entry becomes a number where the mapping is kept (values._mapping_text)
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw  # not valid YAML: keep the text; the type check decides whether it is fine
    if spec is not None and spec.type is str and not isinstance(value, str):
        value = raw
    elif spec is not None and spec.is_list and spec.item_type is str:
        value = raw  # parsed as a list (fedmaml/config/values.py _as_list): [0001] stays the text 0001
    return key, value


def apply_overrides(d: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A deep copy of ``d`` with each ``key.path=value`` override applied, in order."""
    out = _deep_copy(d)
    for text in overrides:
        key, value = parse_override(text)
        _set_path(out, key, value)
    return out


def _deep_copy(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in d.items()}


def config_to_flat(cfg: Config) -> dict[str, Scalar]:
    """``{"algorithm.beta": 0.3, ...}``: every key as a Flower run-config scalar.

    Flower run-config values must be scalars, so lists are written as comma-separated strings
    (``model.hidden: "40,40"``); :func:`config_from_flat` reads them back.
    """
    flat: dict[str, Scalar] = {}
    for spec in schema():
        value: Any = cfg
        for part in spec.path.split("."):
            value = getattr(value, part)
        flat[spec.path] = ",".join(str(v) for v in value) if spec.is_list else value
    return flat


def with_entries(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``flat`` (as :func:`config_to_flat` gives it) and, after each mapping key, one key per entry
    of its mapping: ``algorithm.kwargs.lam: 0.1`` beside ``algorithm.kwargs: '{"lam": 0.1}'``, for
    naming what a sweep varies by the keys it was given."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        out[key] = value
        if key in MAPPING_KEYS and isinstance(value, str) and value.strip():
            mapping = load_mapping_text(value)  # JSON text the config wrote: a mapping
            out.update({f"{key}.{name}": v for name, v in mapping.items()})
    return out


def config_from_flat(flat: Mapping[str, Any], *, source: str = "run config") -> Config:
    """Build a :class:`Config` from dotted keys (a Flower run config); missing keys take defaults."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        try:
            _set_path(nested, str(key), value)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return config_from_dict(nested, source=source)


def replace_paths(cfg: Config, updates: Mapping[str, Any]) -> Config:
    """A validated copy of ``cfg`` with several dotted keys changed at once.

    Changing keys together matters when a cross-field rule links them (e.g. algorithm.name and
    algorithm.meta_gradient): one at a time, the intermediate config could be invalid.
    """
    d = config_to_dict(cfg)
    for path, value in updates.items():
        if path not in SPECS and mapping_entry(path) is None:
            raise ConfigError(f"{path}: unknown key" + suggest(path, list(SPECS)))
        _set_path(d, path, value)
    return config_from_dict(d)


def replace_path(cfg: Config, path: str, value: Any) -> Config:
    """A validated copy of ``cfg`` with one dotted key changed.

    ``replace_path(cfg, "algorithm.beta", 0.7)``; see :func:`replace_paths` for linked keys.
    """
    return replace_paths(cfg, {path: value})


def resolve_key(key: str, values: Sequence[Any] = ()) -> str:
    """The full dotted key that ``key`` names: a full key, or a dotted suffix of exactly one key.

    ``beta`` -> ``algorithm.beta``. When a suffix fits several keys, ``values`` (if given) settle it
    if exactly one of those keys accepts them all: ``mode`` with ``cross_silo`` is
    ``federated.mode``. An unknown or still ambiguous key (``alpha`` with 0.1: ``algorithm.alpha`` or
    ``evaluation.alpha``) is a ConfigError listing the candidates.
    """
    if "." in key and (key in SPECS or mapping_entry(key) is not None):
        return key
    matches = [p for p in SPECS if p == key or p.endswith("." + key)]
    if len(matches) > 1 and values:
        fitting = [p for p in matches if all(_accepts(SPECS[p], v) for v in values)]
        matches = fitting or matches
    if len(matches) == 1:
        return matches[0]
    if not matches:
        # kwargs.lam: the entry lam of a mapping key given by a suffix, which may name several
        parts = key.split(".")
        entries = [f"{m}.{'.'.join(parts[i:])}" for m in MAPPING_KEYS for i in range(1, len(parts))
                   if f".{m}".endswith("." + ".".join(parts[:i]))]
        if entries:
            raise ConfigError(f"{key}: unknown key; an entry of a mapping is set with the "
                              f"mapping's full key: {' or '.join(entries)}")
        leaves = sorted({p.rsplit(".", 1)[-1] for p in SPECS} | set(SPECS))
        raise ConfigError(f"{key}: unknown key" + suggest(key, leaves))
    raise ConfigError(f"{key}: ambiguous key, it could be {', '.join(matches)}; write the full key")


def _accepts(spec: FieldSpec, value: Any) -> bool:
    problems: list[str] = []
    convert_value(spec, value, problems)
    return not problems


def short_key(path: str) -> str:
    """The shortest dotted suffix of ``path`` that :func:`resolve_key` maps back to it."""
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        candidate = ".".join(parts[i:])
        try:
            if resolve_key(candidate) == path:
                return candidate
        except ConfigError:
            continue
    return path
