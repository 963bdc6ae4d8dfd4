"""``fedmaml sweep``: every combination of a grid of config values, once per seed, one run directory
each under a sweep directory.

Layout::

    <sweep dir>/
      sweep.yaml                        the manifest: base config + the `sweep:` section (settings,
                                        grid, seeds)
      beta=0.3,federated.mode=cross_device,seed=0/    a run directory (config.yaml, metrics.jsonl,
      ...                                              summary.json, model.pt, convergence.png)
      MOML,beta=0.3,seed=0/             the same in a sweep with named settings

A run directory is named by its grid values and seed (keys in their shortest unambiguous form, see
:func:`fedmaml.config.short_key`), so its name does not depend on the order of the grid or on other
runs and a re-invoked sweep finds it again. ``summary.json`` is written last by a run: a directory that
has it (and, with ``compare_with``, its baselines too) is finished and skipped, unless its status is
``interrupted``; an unfinished run continues from its checkpoint (``checkpoint.pt``) when it has
one, and is deleted and run again from scratch otherwise. A finished run whose config differs from the
planned one is never silently reused: that is an error naming the keys that differ.

In a sweep with named settings (``settings``), a run directory's name starts with its setting's
name: ``MOML,beta=0.3,seed=0``.

Runs execute one after another in this process (``jobs=1``) or in a pool of worker processes.
Workers are spawned, not forked, because forking a process that has already loaded torch can
deadlock; each worker exits by itself if the sweep process dies, so that no orphan keeps writing into
a run directory that a resumed sweep is rebuilding.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from fedmaml.config import (SWEEP_SECTION, Config, check_value, dump_yaml, load_config,
                            replace_paths, short_key)
from fedmaml.errors import ConfigError, FedmamlError, PatternError
from fedmaml.federated.config_patterns import LayerGroups, config_patterns, declared_layer_groups
from fedmaml.results.run_files import (BASELINES_DIR, CONFIG_FILE, SUMMARY_FILE, read_summary,
                                       run_dirs_of)
from fedmaml.results.wording import counted
from fedmaml.run_dir import (DirectoryLock, clear, config_differences, has_content, load_checkpoint,
                             run_lock)
# The specification and the manifest reader (fedmaml/sweep_spec.py) sit below tracking, which reads
# manifests too; their names stay importable from here, the sweep's public module.
from fedmaml.sweep_spec import (MANIFEST, Reference, SweepSpec, grid_key,  # noqa: F401
                                load_sweep, overlapping, parse_grid_arg, parse_references, parse_seeds,
                                parse_settings, settings_from_section, spec_from_section,
                                split_values, strip_source)
from fedmaml.tracking import one_attempt_per_store, one_attempt_per_store_in_this_process

LOCK_FILE = ".sweep.lock"
ERROR_FILE = "error.txt"  # written into a run directory whose run raised
_MAX_DIR_NAME = 150  # well below the usual 255-byte limit, leaving room for temp-file suffixes


@dataclass(frozen=True)
class PlannedRun:
    name: str  # the run directory's name under the sweep directory
    values: dict[str, Any]  # the grid values of this run (full keys)
    seed: int
    config: Config
    setting: str | None = None  # the named setting (sweep.settings) the run belongs to


@dataclass
class SweepResult:
    sweep_dir: Path
    runs: list[PlannedRun]
    skipped: list[str] = field(default_factory=list)  # finished before this invocation
    ran: list[str] = field(default_factory=list)  # finished by this invocation
    failed: dict[str, str] = field(default_factory=dict)  # name -> error message
    invalid: list[str] = field(default_factory=list)  # combinations left out (skip_invalid)
    #: name -> status (diverged, failed) of the finished runs that did not complete
    not_completed: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Planning: combinations -> validated configs and run directory names
# --------------------------------------------------------------------------------------------------

def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "-".join(_value_text(v) for v in value)
    return str(value)


def run_name(values: Mapping[str, Any], seed: int, setting: str | None = None) -> str:
    """``beta=0.3,federated.mode=cross_silo,seed=0`` (``MOML,beta=0.3,seed=0`` in named setting
    ``MOML``): file-system safe, independent of grid order."""
    parts = [f"{short_key(k)}={_value_text(v)}" for k, v in sorted(values.items())]
    name = ",".join([*parts, f"seed={seed}"])
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "-", name)
    return f"{setting},{name}" if setting else name  # names are validated: parse_settings


def plan_sweep(base: Config, spec: SweepSpec, sweep_dir: str | Path,
               skip_invalid: bool = False) -> tuple[list[PlannedRun], list[str]]:
    """Every (combination, seed) as a validated config; returns the runs and the combinations left
    out as invalid (only with ``skip_invalid``; otherwise an invalid one is a ConfigError)."""
    sweep_dir = Path(sweep_dir)
    grid = {grid_key(k, v, f"grid {k}"): tuple(v) for k, v in spec.grid.items()}  # suffixes too
    if len(grid) != len(spec.grid):
        raise ConfigError(f"grid: a key appears twice ({', '.join(spec.grid)})")
    for a, b in itertools.combinations(sorted(grid), 2):
        if (both := overlapping(a, b)) is not None:  # algorithm.kwargs and an entry of it
            raise ConfigError(f"grid: {a} and {b} both set {both}; vary it in one place")
    named = parse_settings(spec.settings, "settings") if spec.settings else {}
    for name, overrides in named.items():
        for key, other in itertools.product(sorted(overrides), sorted(grid)):
            if (both := overlapping(key, other)) is not None:
                also = "" if key == other else f" ({other})"
                raise ConfigError(f"settings.{name}: {both} is set both by this setting and by "
                                  f"the grid{also}; vary it in one place")
    spec = SweepSpec(grid=grid, seeds=spec.seeds, settings=named, references=spec.references)
    keys = list(grid)
    # Each value alone first, so an error names that value rather than a whole combination.
    for key in keys:
        for value in spec.grid[key]:
            _check_alone(key, value)
        texts = [_value_text(v) for v in spec.grid[key]]
        if len(set(texts)) != len(texts):
            dup = next(t for t in texts if texts.count(t) > 1)
            raise ConfigError(f"grid {key}: value {dup} appears twice")
    runs, invalid = [], []
    groups = _LayerGroupsOf()
    for (named_as, overrides), combo in itertools.product(
            list(named.items()) or [(None, {})], itertools.product(*(spec.grid[k] for k in keys))):
        values = dict(zip(keys, combo))
        label = ", ".join([*([f"setting {named_as}"] if named_as else []),
                           *(f"{short_key(k)}={_value_text(v)}" for k, v in values.items())])
        try:  # together: cross-field rules may link them
            setting = replace_paths(base, {**overrides, **values})
            # every pattern for the model's layer groups, as each run checks them when it sets up:
            # a pattern that does not fit fails here, before any run trains
            found = groups(setting)
            if found is not None:
                config_patterns(setting, found)
        except (ConfigError, PatternError) as e:
            what = ("grid combination" if values else "the base config with" if label
                    else "the base config")
            if not skip_invalid:
                raise ConfigError(f"{what} {label + ' ' if label else ''}is invalid: "
                                  f"{strip_source(e)} (--skip-invalid leaves such combinations "
                                  "out)") from None
            invalid.append(f"{label or 'the base config'}: {strip_source(e)}")
            continue
        for seed in spec.seeds:
            name = run_name(values, seed, named_as)
            if len(name) > _MAX_DIR_NAME:
                raise ConfigError(f"grid: the run directory name {name[:60]}... is longer than "
                                  f"{_MAX_DIR_NAME} characters; use fewer or shorter grid values")
            cfg = replace_paths(setting, {"seed": seed, "name": name,
                                          "output_dir": str(sweep_dir)})
            runs.append(PlannedRun(name=name, values=values, seed=seed, config=cfg,
                                   setting=named_as))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"grid: two combinations share the run directory name {dup!r} (values "
                          "that differ only in characters a file name cannot hold)")
    return runs, invalid


class _LayerGroupsOf:
    """The layer groups of a config's model, for checking its patterns: from the config where it
    gives them (the built-in models, a user's ``model.groups``: no torch in the sweep's process),
    else by building the model once per model and data section (a user's module, whose children
    are its groups and which may take its shapes from the data). ``None`` when that build fails
    (missing data, the user's factory raising): the runs then check, and report, for themselves."""

    def __init__(self) -> None:
        self._built: dict[tuple[Any, Any], LayerGroups | None] = {}

    def __call__(self, cfg: Config) -> LayerGroups | None:
        declared = declared_layer_groups(cfg.model)
        if declared is not None:
            return declared
        key = (cfg.model, cfg.data)  # the seed changes no shape
        if key not in self._built:
            from fedmaml.federated.setup import built_layer_groups  # torch: in this process

            try:
                self._built[key] = built_layer_groups(cfg)
            except Exception:  # noqa: BLE001 - each run that uses it fails with its own error
                self._built[key] = None
        return self._built[key]


def _check_alone(key: str, value: Any) -> None:
    try:
        check_value(key, value)
    except ConfigError as e:
        raise ConfigError(f"grid {e}") from None


# --------------------------------------------------------------------------------------------------
# State of a run directory
# --------------------------------------------------------------------------------------------------

def run_state(run_dir: Path, cfg: Config) -> str:
    """``new``, ``finished`` or ``unfinished``; a finished run made with another config is an error."""
    if not has_content(run_dir):
        return "new"
    if not (run_dir / CONFIG_FILE).exists() and not (run_dir / ERROR_FILE).exists():
        raise FedmamlError(f"{run_dir}: exists but is not a run directory of this sweep (no "
                           f"{CONFIG_FILE}); move it away or use another --sweep-dir")
    done = all(finished_status(d) is not None for d in run_dirs_of(run_dir, cfg.compare_with))
    if not done:
        return "unfinished"
    diff = config_differences(load_config(run_dir / CONFIG_FILE), cfg)
    if diff:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diff[:5])
        raise FedmamlError(f"{run_dir}: a finished run of a different config ({shown}"
                           f"{'; ...' if len(diff) > 5 else ''}); use another --sweep-dir (or "
                           "output directory), or delete that run directory to run it again")
    return "finished"


def finished_status(run_dir: Path) -> str | None:
    """The status of a finished run (completed, diverged, failed); None when it has to run (again):
    no summary.json, or an interrupted run that a checkpoint resumes."""
    from fedmaml.federated.health import run_status

    status = run_status(read_summary(run_dir))
    return None if status == "interrupted" else status


def not_completed(run_dir: Path, cfg: Config) -> str | None:
    """``diverged``/``failed`` when the run or one of its baselines did not complete, else None."""
    for d in run_dirs_of(run_dir, cfg.compare_with):
        status = finished_status(d)
        if status not in (None, "completed"):
            return status
    return None


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------

def execute_run(cfg: Config, run_dir: str | Path) -> tuple[float, str | None]:
    """Run one config into ``run_dir``: ``(seconds, None)`` or ``(seconds, error text)``.

    A directory left by an interrupted attempt continues from its checkpoint (``checkpoint.pt``,
    fedmaml/federated/checkpoint.py) when it has one, and is cleaned and run from scratch
    otherwise. Any exception is caught and written to ``error.txt`` so one bad run does not stop
    the sweep; the directory has no summary.json then, so the next invocation runs it again. A run
    stopped by SIGINT/SIGTERM (checkpointed) stops the sweep: KeyboardInterrupt.
    """
    from fedmaml.experiment import run_experiment  # lazy: torch and flwr, in the worker only
    from fedmaml.results.run_files import CHECKPOINT_FILE

    run_dir = Path(run_dir)
    start = time.perf_counter()
    try:
        lock = run_lock(run_dir).__enter__()  # held while the run trains: no second process in it
    except FedmamlError as e:
        return time.perf_counter() - start, f"FedmamlError: {e}"
    try:
        resume = any(d.joinpath(CHECKPOINT_FILE).exists()
                     for d in run_dirs_of(run_dir, cfg.compare_with))
        if not resume:
            clear(run_dir)  # an interrupted attempt: start clean, no stale files
        (run_dir / ERROR_FILE).unlink(missing_ok=True)
        try:
            run_experiment(cfg, quiet=True, run_dir=run_dir, resume=resume)
        except Exception as e:  # noqa: BLE001 - reported per run, the sweep goes on
            (run_dir / ERROR_FILE).write_text(traceback.format_exc(), encoding="utf-8")
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return time.perf_counter() - start, f"{type(e).__name__}: {first}"
    finally:
        lock.__exit__(None, None, None)
    summary = run_dir / SUMMARY_FILE
    if summary.exists() and json.loads(summary.read_text(encoding="utf-8")).get(
            "status") == "interrupted":
        raise KeyboardInterrupt  # the run checkpointed itself; the sweep stops too
    return time.perf_counter() - start, None


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """``kill PID`` (or a batch system's time limit) stops the sweep like Ctrl-C: workers are stopped
    and the resume hint printed, rather than the process vanishing mid-write."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _worker_init(parent_pid: int) -> None:
    """Exit when the sweep process is gone (killed), instead of running on as an orphan; a
    tracking store that cannot start is tried once by this worker, not by each of its runs."""
    one_attempt_per_store_in_this_process()
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _script_worker_init(parent_pid: int) -> None:
    """A worker of :func:`worker_pool`: exits when its parent is gone, and ignores Ctrl-C while it
    waits for work (a run in it still installs its own handler); the parent stops it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_init(parent_pid)


@contextlib.contextmanager
def worker_pool(workers: int, max_tasks_per_child: int | None = None,
                initializer: Callable[[int], None] = _script_worker_init) -> Iterator[Any]:
    """A ``ProcessPoolExecutor`` of ``workers`` spawned processes, for the sweep and for experiment
    scripts (simulations/): its workers exit when this process is killed, and if the block ends
    with an exception (Ctrl-C) they are killed at once. A gentler stop (``multiprocessing.Pool``'s
    SIGTERM) is, to a run stopping after Ctrl-C, the second signal: it aborts with a traceback in
    every worker. A task stopped by Ctrl-C raises KeyboardInterrupt here. ``initializer`` (given
    this process's id): by default a script's worker, which ignores Ctrl-C while it waits."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=initializer, initargs=(os.getpid(),),
                               max_tasks_per_child=max_tasks_per_child)
    try:
        yield pool
    except BaseException:
        _kill_workers(pool)
        raise
    pool.shutdown(wait=True)


def _kill_workers(pool: Any) -> None:
    """Stop the workers of a ``ProcessPoolExecutor`` now: a resumed sweep must not find them still
    writing into run dirs."""
    for proc in list(getattr(pool, "_processes", {}).values()):
        proc.kill()
    pool.shutdown(wait=True, cancel_futures=True)


def _Lock(sweep_dir: Path) -> DirectoryLock:
    """The exclusive lock on a sweep directory (fedmaml/run_dir.py: an OS lock that the kernel
    releases when the process dies; the holder is named beside it)."""
    return DirectoryLock(sweep_dir, LOCK_FILE, "fedmaml sweep",
                         "wait for it or use another --sweep-dir")


def write_manifest(sweep_dir: Path, base: Config, spec: SweepSpec) -> None:
    """``sweep.yaml``: the base config with the `sweep:` section, itself a valid sweep file whose
    ``<output_dir>/<name>`` is this directory (``fedmaml sweep DIR/sweep.yaml`` resumes it)."""
    from fedmaml.atomic import atomic_write_text

    where = replace_paths(base, {"output_dir": str(sweep_dir.parent), "name": sweep_dir.name})
    named = ({"settings": {n: dict(o) for n, o in spec.settings.items()}} if spec.settings
             else {})
    if spec.references:
        named["references"] = {n: r.manifest_value() for n, r in spec.references.items()}
    section = {SWEEP_SECTION: {**named, "grid": {k: list(v) for k, v in spec.grid.items()},
                               "seeds": list(spec.seeds)}}
    text = ("# fedmaml sweep manifest: the base config and the sweep section of this directory.\n"
            + dump_yaml(where)
            + yaml.safe_dump(section, sort_keys=False, default_flow_style=None))
    atomic_write_text(sweep_dir / MANIFEST, text)


def _refresh_references(sweep_dir: Path, spec: SweepSpec) -> None:
    """A finished sweep run again after its ``references`` were edited (they only label the
    comparison; no run depends on them) keeps its manifest but takes the new references, so that
    ``fedmaml compare`` shows them. Anything else changed, or a sweep running there, leaves it."""
    import dataclasses

    path = sweep_dir / MANIFEST
    if not path.is_file():
        return
    try:
        old_base, old = load_sweep(path)
    except ConfigError:
        return
    if old.references == spec.references or (old.settings, old.grid, old.seeds) != (
            spec.settings, spec.grid, spec.seeds):
        return
    with contextlib.suppress(FedmamlError), _Lock(sweep_dir):
        write_manifest(sweep_dir, old_base, dataclasses.replace(old, references=spec.references))


def default_sweep_dir(base: Config) -> Path:
    return Path(base.output_dir) / base.name


def resolve_jobs(jobs: int, base: Config) -> int:
    if jobs < 0:
        raise ConfigError(f"--jobs: {jobs} is not allowed; use a positive number, or 0 for one per "
                          "CPU core")
    jobs = jobs or os.cpu_count() or 1
    if jobs > 1 and base.engine.name == "ray":
        raise ConfigError(f"--jobs {jobs} with engine.name 'ray': Ray already spreads a run over the "
                          "cores, and several Ray clusters would compete; use --jobs 1")
    return jobs


def execute_batch(configs: list[Config], run_dirs: list[Path], quiet: bool = True
                  ) -> list[tuple[float, str | None]]:
    """Run ``configs`` as one vectorized batch (:func:`execute_one_batch`), then their
    ``compare_with`` baselines, one batch per baseline, each run into its own directory under
    ``<run>/baselines/`` as ``run_experiment`` writes it: one outcome per run (its error, else its
    first baseline's). Runs or baselines that ended before are skipped; after an interruption the
    later batches are not started (as ``run_experiment`` stops a run's later baselines)."""
    from fedmaml.experiment import baseline_config

    start = time.perf_counter()
    errors: list[str | None] = [None] * len(configs)
    names = list(configs[0].compare_with)  # the batch's runs share it (batch_key)
    for name in [None, *names]:
        # a run (or baseline) that ended before stays as it is: the batch would clear it
        todo = [k for k, d in enumerate(run_dirs) if errors[k] is None and finished_status(
            d if name is None else d / BASELINES_DIR / name) is None]
        if not todo:
            continue
        cfgs = [configs[k] if name is None else baseline_config(configs[k], name) for k in todo]
        dirs = [run_dirs[k] if name is None else run_dirs[k] / BASELINES_DIR / name for k in todo]
        for k, (_, error) in zip(todo, execute_one_batch(cfgs, dirs, quiet)):
            errors[k] = error
    return [(time.perf_counter() - start, e) for e in errors]


def execute_one_batch(configs: list[Config], run_dirs: list[Path], quiet: bool = True,
                      until_round: int | None = None) -> list[tuple[float, str | None]]:
    """Run ``configs`` as one vectorized batch (fedmaml/engines/run_batch.py): one outcome per run,
    as :func:`execute_run` gives it. When every run has a checkpoint after the same round the batch
    continues from there; otherwise its leftovers are cleaned and it starts again. An exception
    fails every run of the batch that had not ended (``error.txt`` in each). ``until_round``: every
    run stops after that round with a checkpoint, ``interrupted`` (a rung of ``fedmaml tune``);
    only a stop asked by a signal then stops the caller (KeyboardInterrupt)."""
    from fedmaml.engines.run_batch import run_batch
    from fedmaml.experiment import quiet_frameworks
    from fedmaml.federated.checkpoint import CHECKPOINT_FILE, load, stop_on_signals, stop_requested
    from fedmaml.run_dir import check_resume

    quiet_frameworks()
    start = time.perf_counter()
    with contextlib.ExitStack() as locks:
        try:  # every run directory of the batch is locked while the batch trains
            for d in run_dirs:
                locks.enter_context(run_lock(d))
        except FedmamlError as e:
            return [(time.perf_counter() - start, f"FedmamlError: {e}")] * len(run_dirs)
        try:
            resume = all((d / CHECKPOINT_FILE).exists() for d in run_dirs)
            if resume and len({load(d)["round"] for d in run_dirs}) > 1:
                resume = False  # killed while writing the batch's checkpoints: start it again
            # every run is checked before any change is recorded
            changes = [check_resume(d, c) for d, c in zip(run_dirs, configs)] if resume else []
            for record in filter(None, changes):
                record()
            for d in run_dirs:
                if not resume:
                    clear(d)
                (d / ERROR_FILE).unlink(missing_ok=True)
            with stop_on_signals():  # SIGINT/SIGTERM: every run checkpoints after its round
                summaries = run_batch(configs, run_dirs, quiet=quiet, resume=resume,
                                      until_round=until_round)
                signalled = stop_requested()
        except Exception as e:  # noqa: BLE001 - reported per run, the sweep goes on
            text = traceback.format_exc()
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            outcomes: list[tuple[float, str | None]] = []
            for d in run_dirs:
                if finished_status(d) is not None:  # it ended before the batch failed
                    outcomes.append((time.perf_counter() - start, None))
                    continue
                d.mkdir(parents=True, exist_ok=True)
                (d / ERROR_FILE).write_text(text, encoding="utf-8")
                outcomes.append((time.perf_counter() - start, f"{type(e).__name__}: {first}"))
            return outcomes
    if any(s.get("status") == "interrupted" for s in summaries.values()) and (
            until_round is None or signalled):
        raise KeyboardInterrupt  # the runs checkpointed themselves; the sweep stops too
    return [(time.perf_counter() - start, None)] * len(run_dirs)


def plan_batches(todo: list[PlannedRun], sweep_dir: Path, jobs: int
                 ) -> tuple[list[list[PlannedRun]], list[PlannedRun], dict[str, str]]:
    """``--vectorize``: the runs to train as batches (equal shapes, and equal checkpoint rounds
    when resuming; split when there are fewer batches than ``jobs`` processes), the runs that run
    one by one, and why each of those cannot join a batch."""
    from fedmaml.engines.batch_plan import batch_key, batch_refusal
    from fedmaml.results.run_files import CHECKPOINT_FILE

    groups: dict[tuple, list[PlannedRun]] = {}
    alone: list[PlannedRun] = []
    why: dict[str, str] = {}
    for run in todo:
        reason = batch_refusal(run.config) or _baseline_refusal(run.config)
        at = None
        if reason is None and (sweep_dir / run.name / CHECKPOINT_FILE).exists():
            saved = load_checkpoint(sweep_dir / run.name)  # a corrupt one says how to start again
            at = saved["round"]
            clients = saved["memories"].get("clients", {})
            if any("file" in m for m in clients.values()):
                reason = "its checkpoint refers to memory files on devices"
        if reason is None:
            groups.setdefault((batch_key(run.config), at), []).append(run)
        else:
            alone.append(run)
            why[run.name] = reason
    # Split batches only as far as it takes to give every process work: a bigger batch is cheaper
    # per run.
    split = max(1, math.ceil(jobs / len(groups))) if groups else 1
    batches = []
    for runs in groups.values():
        size = min(math.ceil(len(runs) / min(split, len(runs))), _batch_limit(runs[0].config))
        batches += [runs[at:at + size] for at in range(0, len(runs), size)]
    return batches, alone, why


def _baseline_refusal(cfg: Config) -> str | None:
    """Why one of ``cfg``'s ``compare_with`` baselines cannot run in a batch (``None``: they can)."""
    if not cfg.compare_with:
        return None
    from fedmaml.engines.batch_plan import batch_refusal
    from fedmaml.experiment import baseline_config

    for name in cfg.compare_with:
        if (why := batch_refusal(baseline_config(cfg, name))) is not None:
            return f"its compare_with baseline {name}: {why}"
    return None


def _batch_limit(cfg: Config) -> int:
    """Runs per batch within ``engine.memory_budget_mb``: a batch holds every client's memory of
    every run in memory (a run alone keeps its bank there up to the same budget)."""
    from fedmaml.federated.setup import setup_for

    setup = setup_for(cfg)
    if not setup.algorithm.uses_memory:
        return 1 << 30
    per_run = (sum(v.numel() * v.element_size() for v in setup.initial_params.values())
               * cfg.data.tasks_per_client * setup.federation.num_clients)
    return max(1, int(cfg.engine.memory_budget_mb * 2 ** 20 // max(per_run, 1)))


def train_configs(configs: Sequence[Config], jobs: int = 1, quiet: bool = True,
                  vectorize: bool = True) -> dict[str, str | None]:
    """Train ``configs`` (each into ``<output_dir>/<name>``) as :func:`run_sweep` trains a
    sweep's runs: runs whose ``summary.json`` exists are skipped, the others run as vectorized
    batches where they can (``vectorize``) and one by one otherwise, in ``jobs`` processes, each
    resuming from its checkpoint. For experiment scripts that build their configs themselves.
    Returns each trained run's error (``None``: it ran to its end), by run directory."""
    runs, by_dir = [], {}
    for cfg in configs:
        run_dir = Path(cfg.output_dir) / cfg.name
        if run_state(run_dir, cfg) != "finished":  # a finished run of another config is an error
            run = PlannedRun(name=str(run_dir), values={}, seed=cfg.seed, config=cfg)
            runs.append(run)
            by_dir[run.name] = run_dir
    batches: list[list[PlannedRun]] = []
    if vectorize and runs:
        groups: dict[Path, list[PlannedRun]] = {}
        for run in runs:
            groups.setdefault(by_dir[run.name].parent, []).append(run)
        alone = []
        for parent, members in groups.items():
            b, rest, _ = plan_batches(members, parent, jobs)
            batches += b
            alone += rest
        runs = alone
    work = [(execute_batch, ([r.config for r in b], [by_dir[r.name] for r in b], quiet), b)
            for b in batches]
    work += [(execute_run, (r.config, by_dir[r.name]), [r]) for r in runs]
    errors: dict[str, str | None] = {}

    def record(members: list[PlannedRun], outcome: Any) -> None:
        outcomes = outcome if isinstance(outcome, list) else [outcome] * len(members)
        for run, (_, error) in zip(members, outcomes):
            errors[run.name] = error

    if jobs <= 1 or len(work) <= 1:
        for fn, args, members in work:
            record(members, fn(*args))
    else:
        _run_pool(work, min(jobs, len(work)), record)
    return errors


def run_sweep(base: Config, spec: SweepSpec, sweep_dir: str | Path | None = None, jobs: int = 1,
              quiet: bool = False, skip_invalid: bool = False, dry_run: bool = False,
              stream: TextIO | None = None, vectorize: bool = False) -> SweepResult:
    """Plan the sweep, skip finished runs, run the rest (in ``jobs`` processes), report progress.
    ``vectorize``: runs of equal shapes train together as batches (:func:`plan_batches`)."""
    from fedmaml.results.progress import Progress

    out = stream or (sys.stdout if dry_run else sys.stderr)  # a listing is output, not progress
    sweep_dir = Path(sweep_dir) if sweep_dir is not None else default_sweep_dir(base)
    if (sweep_dir / CONFIG_FILE).exists():
        # e.g. `fedmaml run X.yaml` then `fedmaml sweep X.yaml`: both default to output_dir/name
        raise FedmamlError(f"{sweep_dir}: is a run directory (a run of this config was made "
                           f"there), not a sweep directory; give another, e.g. --sweep-dir "
                           f"{sweep_dir.with_name(sweep_dir.name + '-sweep')}")
    jobs = resolve_jobs(jobs, base)
    runs, invalid = plan_sweep(base, spec, sweep_dir, skip_invalid)
    result = SweepResult(sweep_dir=sweep_dir, runs=runs, invalid=invalid)
    states = {r.name: run_state(sweep_dir / r.name, r.config) for r in runs}
    todo = [r for r in runs if states[r.name] != "finished"]
    result.skipped = [r.name for r in runs if states[r.name] == "finished"]
    for r in runs:
        bad = not_completed(sweep_dir / r.name, r.config) if states[r.name] == "finished" else None
        if bad:
            result.not_completed[r.name] = bad

    def say(text: str) -> None:
        if dry_run or not quiet:
            print(text, file=out, flush=True)

    say(f"sweep {sweep_dir}: {counted(len(runs), 'run')} ("
        f"{counted(len(runs) // len(spec.seeds), 'setting')} x {counted(len(spec.seeds), 'seed')}); "
        f"{len(result.skipped)} finished already, {len(todo)} to run"
        + (f" on {min(jobs, len(todo))} processes" if jobs > 1 and todo else ""))
    for line in invalid:
        say(f"  left out (invalid): {line}")
    if dry_run:
        for r in runs:
            say(f"  {states[r.name]:<10} {r.name}")
        return result
    if not todo:
        _refresh_references(sweep_dir, spec)
        return result

    sweep_dir.mkdir(parents=True, exist_ok=True)
    # one_attempt_per_store: a tracking store that cannot start is tried once by the runs of this
    # process (each worker process tries it once too)
    with _Lock(sweep_dir), one_attempt_per_store():
        write_manifest(sweep_dir, base, spec)
        total = len(todo)

        def record(run: PlannedRun, outcome: tuple[float, str | None]) -> str:
            """Note how ``run`` ended; return its progress text."""
            seconds, error = outcome
            if error is None:
                result.ran.append(run.name)
                bad = not_completed(sweep_dir / run.name, run.config)
                if bad:
                    result.not_completed[run.name] = bad
            else:
                result.failed[run.name] = error
            status = (f"failed: {error}" if error else
                      f"{result.not_completed.get(run.name, 'done')} in {seconds:.1f}s")
            return f"{run.name} {status}"

        batches: list[list[PlannedRun]] = []
        if vectorize:
            batches, todo, why = plan_batches(todo, sweep_dir, jobs)
            say(f"vectorized: {sum(map(len, batches))} runs in {len(batches)} batch(es) of "
                f"{', '.join(str(len(b)) for b in batches) or '-'} runs"
                + (f"; {len(todo)} run(s) one by one" if todo else ""))
            for reason in sorted(set(why.values())):
                names = [n for n, r in why.items() if r == reason]
                say(f"  one by one ({reason}): {len(names)} run(s), e.g. {names[0]}")
        # A batch shows its rounds when it runs here; batches of parallel workers would draw their
        # lines over each other and over the sweep's, which goes on ticking for them.
        quiet_batches = quiet or (jobs > 1 and len(batches) + len(todo) > 1)
        jobs_of = [(execute_batch, ([r.config for r in b], [sweep_dir / r.name for r in b],
                                    quiet_batches), b) for b in batches]
        jobs_of += [(execute_run, (r.config, sweep_dir / r.name), [r]) for r in todo]
        # The first min(jobs, work items) updates end the workers' first items, each carrying
        # its own start: the warm-up of the ETA (with more jobs than items, every update is one).
        progress = Progress(total, label="run", quiet=quiet, stream=out,
                            warmup_updates=min(jobs, len(jobs_of)))

        def record_all(members: list[PlannedRun], outcome: Any) -> None:
            outcomes = outcome if isinstance(outcome, list) else [outcome] * len(members)
            texts = [record(run, o) for run, o in zip(members, outcomes)]
            # one update for a batch: its runs end together, and an update per run would read as
            # runs measured 0 s apart (the ETA is the time per run between updates)
            info = texts[0] if len(texts) == 1 else f"{len(texts)} runs of a batch: {texts[-1]}"
            failed = f" | {len(result.failed)} failed" if result.failed else ""
            progress.update(len(result.ran) + len(result.failed), info + failed)

        try:
            with _sigterm_as_interrupt(), progress:
                if jobs == 1 or len(jobs_of) == 1:
                    for fn, args, members in jobs_of:
                        record_all(members, fn(*args))
                else:
                    _run_pool(jobs_of, min(jobs, len(jobs_of)), record_all)
        except KeyboardInterrupt:
            say(f"\ninterrupted: {len(result.ran)} of {len(runs) - len(result.skipped)} runs "
                "finished in this invocation; run the same command again to resume")
            raise
    for name, error in result.failed.items():
        say(f"failed: {name}: {error} (see {sweep_dir / name / ERROR_FILE})")
    return result


def _run_pool(work: list[tuple[Any, tuple, list[PlannedRun]]], jobs: int, record: Any) -> None:
    """Run ``work`` (``(function, arguments, its runs)``) in ``jobs`` spawned worker processes;
    ``record(runs, outcome)`` as each finishes."""
    from concurrent.futures import FIRST_COMPLETED, wait

    with worker_pool(jobs, initializer=_worker_init) as pool:
        futures = {pool.submit(fn, *args): runs for fn, args, runs in work}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                runs = futures[fut]
                try:
                    outcome = fut.result()
                except Exception as e:  # noqa: BLE001 - a worker died (killed, out of memory)
                    outcome = (0.0, f"worker process died: {type(e).__name__}: {e}")
                record(runs, outcome)


def sweep_summary(result: SweepResult) -> str:
    """The closing lines of ``fedmaml sweep``."""
    lines = [f"sweep {result.sweep_dir}: {counted(len(result.runs), 'run')}; "
             f"{len(result.skipped)} were finished already, {len(result.ran)} ran now, "
             f"{len(result.failed)} failed"]
    by_status: dict[str, list[str]] = {}
    for name, status in result.not_completed.items():
        by_status.setdefault(status, []).append(name)
    for status, names in sorted(by_status.items()):
        lines.append(f"{len(names)} run(s) {status} (see their summary.json): " + ", ".join(names))
    if result.failed:
        lines.append("run the same command again to retry the failed runs")
    else:
        lines.append(f"compare them: fedmaml compare {result.sweep_dir}")
    return "\n".join(lines)

