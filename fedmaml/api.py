"""``fedmaml.run``: the Python entry point, for a config and optionally your own model and
algorithm.

.. code-block:: python

    import fedmaml
    run_dir = fedmaml.run("quickstart", model=my_factory, **{"model.kwargs": {"width": 32}})

It goes through what ``fedmaml run`` goes through (fedmaml/experiment.py, and the checks of a run
directory in fedmaml/run_dir.py); what differs is said in :func:`run`. See docs/custom.md ("The
Python API", "Your own model", "Your own algorithm").
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Mapping

from fedmaml.algorithms.registry import AlgorithmSource
from fedmaml.algorithms.registry import register as register_algorithm
from fedmaml.config.schema import Config
from fedmaml.errors import ConfigError, FedmamlError
from fedmaml.models.module import ModelSource, register


def run(config: Config | Mapping[str, Any] | str | Path | None = None,
        model: ModelSource | None = None, *,
        algorithm: AlgorithmSource | None = None, run_dir: str | Path | None = None,
        resume: bool = False, restart: bool = False, quiet: bool = False,
        **overrides: Any) -> Path:
    """Run an experiment (and its ``compare_with`` baselines); return its run directory, as
    ``fedmaml run`` does.

    ``config``: a :class:`fedmaml.config.Config`, a mapping (as the YAML), a YAML path or a bundled
    config's name; None: the defaults, or with ``resume``/``restart`` the ``config.yaml`` of
    ``run_dir`` (as ``fedmaml run --resume``/``--restart`` take it).

    ``model``: a ``torch.nn.Module`` or a callable returning one (its keyword arguments from
    ``model.kwargs``); it replaces ``model.name``. ``algorithm``: a
    :class:`fedmaml.algorithms.Algorithm` instance, or a subclass or factory (called with
    ``algorithm.kwargs``); it replaces ``algorithm.name`` (docs/custom.md, "Your own algorithm").
    A factory or class defined at the top level of an importable module is recorded by its import
    path, so every engine (and ``config.yaml`` of the run) can build it again. A module or
    algorithm instance, a lambda or a function of your script's ``__main__`` lives only in this
    process: the inprocess and vectorized engines take it, the Ray and sharded engines refuse it
    (give an import path instead).

    ``overrides``: config keys by their full dotted name, e.g. ``**{"federated.rounds": 5}`` (the
    top-level ones also as keywords: ``seed=3``, ``name="x"``). A keyword that is neither an
    argument nor a key is refused, with the closest of them.

    ``run_dir``: the run directory; None: a new one, ``<output_dir>/<name>`` (``-2``, ``-3``... when
    taken), as ``fedmaml run`` picks it. A given ``run_dir`` must be new (absent or empty): one
    that holds a run is refused, saying what it holds, rather than overwritten. ``resume=True``
    continues the unfinished run in ``run_dir`` from its checkpoint; only the keys that
    ``fedmaml run --resume`` lets change may differ from the config it was made from
    (``federated.rounds``, more than its checkpoint's round, ``federated.checkpoint_every``,
    ``engine.shards``, ``engine.ray_address``; docs/robustness.md); a run that ended is left as it
    is (one line says so) and its directory returned; a new ``run_dir`` starts a run, so that a
    loop over seeds called again continues where it stopped. ``restart=True`` moves ``run_dir``
    aside (to ``.<name>.old-N`` beside it: nothing is deleted) and runs there from the beginning.

    Ctrl-C (SIGINT) or SIGTERM stops the run after its current round with a checkpoint (a second
    one aborts at once), as in ``fedmaml run``; the run directory then holds the unfinished run and
    this function raises ``KeyboardInterrupt``, naming it, so that a loop over runs stops too.
    ``fedmaml.run(..., run_dir=<it>, resume=True)`` continues it. A run that ends otherwise returns
    its directory, whatever its status (``completed``, ``diverged``, ``failed``: ``summary.json``
    says which and why; read it with ``fedmaml.results.run_files.read_summary``).

    Raises :class:`fedmaml.errors.FedmamlError` (``ConfigError``, ``DataError``...) for a bad config
    or run directory, with what to do.
    """
    from fedmaml import run_dir as rd
    from fedmaml.bundled import resolve_config
    from fedmaml.config import (Config, config_from_dict, config_to_dict, load_config,
                                replace_paths)
    from fedmaml.experiment import run_experiment, statuses
    from fedmaml.federated import checkpoint
    from fedmaml.results.run_files import advising_python, resume_command

    _check_keywords(overrides)
    if resume and restart:
        raise FedmamlError("fedmaml.run: give resume=True (continue the run in run_dir) or "
                           "restart=True (start it again), not both")
    if (resume or restart) and run_dir is None:
        raise FedmamlError(f"fedmaml.run: {'resume' if resume else 'restart'}=True needs "
                           "run_dir=, the run directory to "
                           f"{'continue' if resume else 'start again'}")
    if isinstance(config, Config):
        cfg = config
    elif isinstance(config, Mapping):
        cfg = config_from_dict(config, source="fedmaml.run config")
    elif config is None and run_dir is not None and (resume or restart):
        saved = Path(run_dir) / "config.yaml"
        if not saved.is_file():
            raise FedmamlError(f"fedmaml.run: config=None with {'resume' if resume else 'restart'}"
                               f"=True runs the config.yaml of run_dir, and {run_dir} has none "
                               "(no run there): give the config")
        cfg = load_config(saved)
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
    # the advice of the checks `fedmaml run` makes, in these arguments; the run's own stop block
    # is this one, so that a stop asked for as the last round ends is still seen here
    with advising_python(), checkpoint.stop_on_signals():
        if run_dir is not None:
            rd.given_run_dir(run_dir, resume=resume, restart=restart)
        out = run_experiment(cfg, quiet=quiet, run_dir=run_dir, resume=resume, restart=restart)
        stopped = [d for d, s in statuses(out, cfg).items() if s == "interrupted"]
        if stopped:  # by Ctrl-C or SIGTERM (or checkpoint.request_stop), with a checkpoint
            raise KeyboardInterrupt(f"{stopped[0]}: interrupted, with a checkpoint; "
                                    f"{resume_command(out)} continues it")
        if checkpoint.stop_requested():  # too late to stop the run: it ended; the caller stops
            raise KeyboardInterrupt(f"{out}: stopped as the run ended (it ended, see its "
                                    "summary.json)")
    return out


#: The keyword arguments of :func:`run` (the rest of its keywords are config keys).
_PARAMETERS = tuple(inspect.signature(run).parameters)[:-1]


def _check_keywords(overrides: Mapping[str, Any]) -> None:
    """Refuse a keyword that is neither an argument of :func:`run` nor a config key, suggesting the
    full name of a key given by its last part (``rounds=``: ``**{'federated.rounds': ...}``), else
    the closest argument or top-level key (``rundir=``: ``run_dir``)."""
    from fedmaml.config.schema import SPECS, mapping_entry
    from fedmaml.config.values import suggest

    for key in overrides:
        if key in SPECS or mapping_entry(key) is not None:
            continue
        full = [p for p in SPECS if p.endswith("." + key)]
        if full:
            hint = "; did you mean " + " or ".join(f"**{{{p!r}: ...}}" for p in full) + "?"
        else:  # a keyword is a Python name: an argument, or a key without a dot
            hint = suggest(key, [*_PARAMETERS, *(p for p in SPECS if "." not in p)])
        raise ConfigError(f"fedmaml.run: {key}=: not an argument of fedmaml.run "
                          f"({', '.join(_PARAMETERS)}) nor a config key (a key is given by its "
                          f"full dotted name, e.g. **{{'federated.rounds': 5}}){hint}")
