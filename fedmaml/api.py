"""``fedmaml.run``: the Python entry point, for a config and optionally your own model and
algorithm.

.. code-block:: python

    import fedmaml
    run_dir = fedmaml.run("quickstart", model=my_factory, **{"model.kwargs": {"width": 32}})

See docs/custom.md ("Your own model", "Your own algorithm").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from fedmaml.algorithms.registry import AlgorithmSource
from fedmaml.algorithms.registry import register as register_algorithm
from fedmaml.config.schema import Config
from fedmaml.errors import ConfigError
from fedmaml.models.module import ModelSource, register


def run(config: Config | Mapping[str, Any] | str | Path | None = None,
        model: ModelSource | None = None, *,
        algorithm: AlgorithmSource | None = None, run_dir: str | Path | None = None,
        quiet: bool = False, **overrides: Any) -> Path:
    """Run an experiment; return its run directory (as ``fedmaml run``).

    ``config``: a :class:`fedmaml.config.Config`, a mapping (as the YAML), a YAML path or a bundled
    config's name (None: the defaults). ``model``: a ``torch.nn.Module`` or a callable returning one
    (its keyword arguments from ``model.kwargs``); it replaces ``model.name``. ``overrides``: dotted
    keys, e.g. ``**{"federated.rounds": 5}``. ``algorithm``: a
    :class:`fedmaml.algorithms.Algorithm` instance, or a subclass or factory (called with
    ``algorithm.kwargs``); it replaces ``algorithm.name`` (docs/custom.md, "Your own algorithm").

    A factory defined at the top level of an importable module is recorded by its import path, so
    every engine (and ``config.yaml`` of the run) can build it again; so is an algorithm class. A
    module or algorithm instance, a lambda or
    a function of your script's ``__main__`` lives only in this process: the inprocess and
    vectorized engines take it, the Ray and sharded engines refuse it (give an import path
    instead).
    """
    from fedmaml.bundled import resolve_config
    from fedmaml.config import (Config, config_from_dict, config_to_dict, load_config,
                                replace_paths)
    from fedmaml.experiment import run_experiment

    if isinstance(config, Config):
        cfg = config
    elif isinstance(config, Mapping):
        cfg = config_from_dict(config, source="fedmaml.run config")
    else:
        cfg = load_config(None if config is None else resolve_config(str(config)))
    updates = dict(overrides)
    if model is not None:
        updates["model.name"] = register(model)
    if algorithm is not None:
        updates["algorithm.name"] = register_algorithm(algorithm)
    if updates:
        d = config_to_dict(cfg)
        cfg = replace_paths(config_from_dict(d), updates)
    if cfg.algorithm.name.startswith("python:") and cfg.engine.name in ("ray", "sharded"):
        raise ConfigError("fedmaml.run: algorithm is a Python object that lives only in this "
                          "process; Ray runs clients in other processes. Give a class importable "
                          "by name ('package.module:Name', top-level in an installed or PYTHONPATH "
                          "module), or use engine.name inprocess or vectorized")
    if cfg.model.name.startswith("python:") and cfg.engine.name in ("ray", "sharded"):
        raise ConfigError("fedmaml.run: model is a Python object that lives only in this process; "
                          "Ray runs clients in other processes. Give a factory importable by name "
                          "('package.module:factory', a top-level function of an installed or "
                          "PYTHONPATH module), or use engine.name inprocess or vectorized")
    return run_experiment(cfg, quiet=quiet, run_dir=run_dir)
