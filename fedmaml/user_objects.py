"""Objects a config names that are the user's own: an import path ``package.module:attr`` (any
process can resolve it: Ray workers, devices) or ``python:<name>-<n>``, an object handed to the
Python API (``fedmaml.run(model=..., algorithm=...)``) that only this process knows.

One mechanism for every such key (``model.name``, ``algorithm.name``): the callers say what kind of
object they expect and check it; this module only names, registers and imports.
"""

from __future__ import annotations

import importlib
import itertools
import json
import re
from typing import Any

import yaml

from fedmaml.errors import ConfigError

PYTHON_PREFIX = "python:"
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_import_path(name: str) -> bool:
    """``package.module:attr`` (the form a config can carry to other processes)."""
    return bool(_IMPORT_PATH.match(name))


def is_user_object(name: str) -> bool:
    """``name`` names the user's own object: an import path or a ``python:`` name."""
    return name.startswith(PYTHON_PREFIX) or is_import_path(name)


def import_path_of(source: Any) -> str | None:
    """``module:qualname`` when ``source`` is a top-level function or class of an importable
    module (not ``__main__``) whose name resolves back to it; None otherwise (instances have no
    qualified name, lambdas and nested functions cannot be imported)."""
    module, qualname = getattr(source, "__module__", None), getattr(source, "__qualname__", "")
    if not module or module == "__main__" or not qualname or "<" in qualname:
        return None
    try:
        found = _resolve_attr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError):
        return None
    return f"{module}:{qualname}" if found is source else None


def _resolve_attr(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


class Registry:
    """The objects of one config key given from Python, by the ``python:`` names they got."""

    def __init__(self, key: str, import_form: str) -> None:
        self.key, self.import_form = key, import_form  # e.g. "model.name", "package.module:factory"
        self._objects: dict[str, Any] = {}

    def register(self, source: Any) -> str:
        """The name under which ``source`` can be given as ``self.key``: its import path when it
        has one, else a new ``python:`` name that only this process knows."""
        path = import_path_of(source)
        if path is not None:
            return path
        base = getattr(source, "__name__", type(source).__name__)
        for i in itertools.count(1):
            name = f"{PYTHON_PREFIX}{base}-{i}"
            if self._objects.get(name, source) is source:
                self._objects[name] = source
                return name
        raise AssertionError("unreachable")

    def load(self, name: str, expects: str) -> Any:
        """The object ``name`` (a ``python:`` name or an import path) stands for; a ConfigError
        naming the key otherwise. ``expects`` says what the attribute should be, for the message."""
        if name.startswith(PYTHON_PREFIX):
            if name not in self._objects:
                raise ConfigError(
                    f"{self.key}: {name!r} was given from Python in another process; this process "
                    "cannot see it. Engines that run clients in other processes (ray, deployment) "
                    f"need an import path '{self.import_form}'")
            return self._objects[name]
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ConfigError(f"{self.key}: cannot import module {module_name!r} of {name!r} ({e}); "
                              "the module must be importable (installed, or on PYTHONPATH)") from None
        try:
            return _resolve_attr(module, attr)
        except AttributeError:
            raise ConfigError(f"{self.key}: module {module_name!r} has no attribute {attr!r}; "
                              f"write '{self.import_form}' with {expects}") from None


def load_mapping_text(text: str) -> Any:
    """The value of a mapping key's text: JSON as the config writes it, else YAML as a user writes
    it (``{lam: 0.1}``)."""
    try:
        return json.loads(text)
    except ValueError:
        return yaml.safe_load(text)


def parse_mapping(key: str, text: str) -> dict[str, Any]:
    """A config mapping kept as text (``model.kwargs``, ``model.groups``, ``algorithm.kwargs``);
    ``""`` is empty."""
    if not text.strip():
        return {}
    try:
        value = load_mapping_text(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: {text!r} is not a mapping ({e})") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{key}: expected a mapping such as {{hidden: 64}}, got {text!r}")
    return value
