"""``algorithm.name`` -> an :class:`~fedmaml.algorithms.base.Algorithm` (docs/custom.md, "Your own
algorithm").

A name is a built-in algorithm (``moml``, ...), an import path ``package.module:Name`` of an
``Algorithm`` subclass or factory (called with ``algorithm.kwargs``) or of an ``Algorithm`` instance
(no kwargs), or ``python:...``: an algorithm given to ``fedmaml.run(algorithm=...)`` that lives only
in this process (the inprocess and vectorized engines take it; Ray and devices need an import path).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Union

from fedmaml.algorithms.base import Algorithm
from fedmaml.algorithms.fedavg import FEDAVG
from fedmaml.algorithms.fedmeta import FEDMETA
from fedmaml.algorithms.moml import MOML
from fedmaml.algorithms.per_fedavg import PER_FEDAVG
from fedmaml.algorithms.reptile import REPTILE
from fedmaml.errors import ConfigError
from fedmaml.user_objects import Registry, is_user_object, parse_mapping

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (MOML, PER_FEDAVG, FEDMETA, REPTILE, FEDAVG)}

AlgorithmSource = Union[Algorithm, Callable[..., Algorithm]]
_ALGORITHMS_GIVEN = Registry("algorithm.name", "package.module:Name")


def get_algorithm(name: str, kwargs: str | Mapping[str, Any] = "") -> Algorithm:
    """The algorithm ``algorithm.name`` names, built with ``algorithm.kwargs`` (a mapping, or its
    YAML/JSON text as the config keeps it); a :class:`ConfigError` naming the key otherwise."""
    given = parse_mapping("algorithm.kwargs", kwargs) if isinstance(kwargs, str) else dict(kwargs)
    if name in ALGORITHMS:
        if given:
            raise ConfigError(f"algorithm.kwargs: {given!r} given, but the built-in algorithm "
                              f"{name!r} takes none (its hyperparameters are algorithm.* keys); "
                              "kwargs are for your own algorithm 'package.module:Name'")
        return ALGORITHMS[name]
    source = _load(name)
    if isinstance(source, Algorithm):
        if given:
            raise ConfigError(f"algorithm.kwargs: {given!r} given, but algorithm.name {name!r} is "
                              "an Algorithm instance, which takes none; point algorithm.name at "
                              "its class (or a factory) to pass kwargs")
        return source
    if not callable(source) or (inspect.isclass(source) and not issubclass(source, Algorithm)):
        raise ConfigError(f"algorithm.name: {name!r} is a {type(source).__name__}, not an "
                          "Algorithm (a subclass of fedmaml.algorithms.Algorithm, an instance of "
                          "one, or a factory returning one)")
    _check_kwargs(name, source, given)
    try:
        algorithm = source(**given)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"algorithm.kwargs: {name} rejected {given!r}: {e}") from None
    if not isinstance(algorithm, Algorithm):
        raise ConfigError(f"algorithm.name: {name!r} returned a {type(algorithm).__name__}, not "
                          "an Algorithm; subclass fedmaml.algorithms.Algorithm (docs/custom.md)")
    return algorithm


def _check_kwargs(name: str, source: Callable[..., Any], given: dict[str, Any]) -> None:
    """Unknown or missing keyword arguments, named with what the signature allows."""
    try:
        sig = inspect.signature(source)
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return
    params = [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        allowed = None
    else:
        allowed = [p.name for p in params if p.kind is not p.POSITIONAL_ONLY]
    unknown = [k for k in given if allowed is not None and k not in allowed]
    if unknown:
        raise ConfigError(f"algorithm.kwargs: {name} takes no argument {', '.join(unknown)}; "
                          f"allowed: {', '.join(allowed) or '(none)'}")
    missing = [p.name for p in params if p.default is p.empty and p.name not in given]
    if missing:
        raise ConfigError(f"algorithm.kwargs: {name} needs {', '.join(missing)} (give them as "
                          f"algorithm.kwargs, e.g. {{{missing[0]}: ...}})")


def _load(name: str) -> AlgorithmSource:
    if not is_user_object(name):
        raise ConfigError(f"algorithm.name: {name!r} is not allowed; allowed: "
                          f"{', '.join(ALGORITHMS)}, or an import path 'package.module:Name' of "
                          "your own Algorithm")
    return _ALGORITHMS_GIVEN.load(name, "an Algorithm subclass, instance or factory")


def register(source: AlgorithmSource) -> str:
    """Make an algorithm (an instance, a class or a factory) given from Python usable as
    ``algorithm.name``; return that name: its import path when it has one (a top-level class or
    function of an importable module), else ``python:...`` (this process only)."""
    return _ALGORITHMS_GIVEN.register(source)

