"""YAML files: a config file read with duplicate keys refused and integers kept as written, the
``sweep:`` section split off, overrides applied; and a config written back as YAML."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from fedmaml.config.paths import apply_overrides
from fedmaml.config.schema import SWEEP_SECTION, Config
from fedmaml.config.validate import config_from_dict, config_to_dict
from fedmaml.errors import ConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class YamlInt(int):
    """An integer that YAML read from text other than its decimal spelling (``011`` is 9 in
    YAML 1.1, ``0001`` is 1): ``yaml_text`` keeps what was written, for error messages."""

    yaml_text: str = ""


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    value = loader.construct_yaml_int(node)
    if node.value.strip() == str(value):
        return value
    out = YamlInt(value)
    out.yaml_text = node.value.strip()
    return out


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"config path is not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        # PyYAML's own text names "<unicode string>"; point at the file and line instead.
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        context = getattr(e, "context", None)
        raise ConfigError(f"{where}: invalid YAML: {problem}"
                          + (f" ({context})" if context else "")) from None
    if data is None:
        raise ConfigError(f"{path}: the config file is empty (or holds only comments); write at "
                          "least one key, e.g. 'name: my-run' (the others take their defaults; "
                          "`fedmaml config show` lists them)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (e.g. 'name: run'), "
                          f"got a {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config file (or the defaults when ``path`` is None) and apply dotted overrides."""
    data = _read_yaml(Path(path)) if path is not None else {}
    if SWEEP_SECTION in data:
        raise ConfigError(f"{path}: has a '{SWEEP_SECTION}:' section, which describes several runs; "
                          f"run it with `fedmaml sweep {path}`, or remove the section to run one "
                          "config")
    return _config_from_data(data, path, overrides)


def load_config_and_sweep(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, Any]:
    """A config file that may hold a ``sweep:`` section: the config without it, and the section's
    raw value (None when absent) for :mod:`fedmaml.sweep` to validate."""
    data = _read_yaml(Path(path))
    sweep = data.pop(SWEEP_SECTION, None)
    return _config_from_data(data, path, overrides), sweep


def _config_from_data(data: dict[str, Any], path: str | Path | None,
                      overrides: Sequence[str]) -> Config:
    data = apply_overrides(data, overrides)
    source = str(path) if path is not None else "defaults"
    if overrides:
        source += " with overrides"
    return config_from_dict(data, source=source)


class _Dumper(yaml.SafeDumper):
    """Block-style sections, inline lists ("hidden: [40, 40]"), as a person would write them."""


_Dumper.add_representer(YamlInt, yaml.SafeDumper.represent_int)
yaml.SafeDumper.add_representer(YamlInt, yaml.SafeDumper.represent_int)  # sweep manifests
_Dumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value,
                                                          flow_style=True))


def dump_yaml(cfg: Config) -> str:
    """The config as YAML (every key, schema order) that :func:`load_config` reads back unchanged."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
