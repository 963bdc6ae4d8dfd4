"""``fedmaml compare``: load finished runs, group them into settings, refuse what cannot be compared,
and compute the curves and numbers that the figures (compare_plots.py), the Markdown report
(compare_report.py) and the CSV, LaTeX and JSON tables (compare_tables.py) show;
:func:`build_comparison` is the entry point.

A *setting* is a config up to its seed: runs whose configs differ only in ``seed`` (and in the keys
that name or place a run: ``name``, ``output_dir``, ``compare_with``) are seeds of one setting and are
averaged, with a band over seeds. Runs of a sweep with named settings (``sweep.settings`` in its
``sweep.yaml``, fedmaml/sweep_spec.py) are grouped and labelled by those names, in the sweep's order.
Runs are comparable when they measure the same metric on the same task family; the requested metric
must exist in every run. Anything else is a :class:`CompareError`
that says which runs differ and how, rather than a misleading plot.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmaml.config import Config, config_to_flat, load_config, short_key, with_entries
from fedmaml.errors import FedmamlError
# the file names from run_files.py, not the recorder, which imports torch: seconds on every compare
from fedmaml.results.run_files import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE
from fedmaml.results.wording import counted
from fedmaml.sweep_spec import MANIFEST, TRAIN_METRICS, Reference, metric_key, parse_references
from fedmaml.tracking.base import TRACKER_DIRS

#: Keys that name or place a run, or add baselines next to it: not part of its setting.
IDENTITY_KEYS = ("seed", "name", "output_dir", "compare_with")
#: Keys that change how a run is evaluated: settings differing in them measure different things.
EVALUATION_KEYS = ("data.eval_adapt_size", "data.eval_heldout_size", "data.heldout_fraction",
                   "federated.eval_clients")
X_AXES = ("rounds", "samples", "bytes", "seconds")
BANDS = ("std", "sem", "minmax")


class CompareError(FedmamlError, ValueError):
    """The runs given to compare cannot be compared (or there are none)."""


@dataclass(frozen=True)
class NamedSetting:
    """A named setting of a sweep (``sweep.settings`` of its manifest): its name, its place in the
    sweep's list, the config values it sets, and the number reported elsewhere for it, if any."""

    name: str
    index: int
    overrides: dict[str, Any]
    reference: Reference | None = None
    #: why the manifest's references could not be read (a hand-edited sweep.yaml): none is shown
    reference_problem: str | None = None


@dataclass
class Run:
    dir: Path
    config: Config
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    named: NamedSetting | None = None

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def status(self) -> str:
        """completed, diverged, failed or interrupted (runs from before statuses: completed)."""
        return str(self.summary.get("status", "completed"))


@dataclass
class Setting:
    """Runs of one config up to the seed. ``runs`` completed and make its numbers; ``incomplete``
    (diverged or failed) are reported beside them, never averaged in."""

    runs: list[Run]
    label: str = ""
    values: dict[str, Any] = field(default_factory=dict)  # the keys in which settings differ
    incomplete: list[Run] = field(default_factory=list)
    named: NamedSetting | None = None  # the sweep's named setting, when it has them

    def incomplete_text(self) -> str:
        """``1 diverged (seed 2), 1 failed (seed 0)``; empty when every run completed."""
        by_status: dict[str, list[int]] = {}
        for r in self.incomplete:
            by_status.setdefault(r.status, []).append(r.seed)
        return ", ".join(f"{len(seeds)} {status} ({'seed' if len(seeds) == 1 else 'seeds'} "
                         f"{', '.join(map(str, sorted(seeds)))})"
                         for status, seeds in sorted(by_status.items()))

    @property
    def config(self) -> Config:
        return self.runs[0].config


@dataclass(frozen=True)
class Metric:
    key: str  # "seen.loss.mean" (an evaluation key) or "loss_after" (a training key)
    higher_is_better: bool

    @property
    def is_train(self) -> bool:
        return self.key in TRAIN_METRICS

    def clients_key(self, task_metric: str) -> str:
        """The per-client values behind this metric (``seen.loss.clients``) for the distribution."""
        if self.is_train:
            return f"seen.{task_metric}.clients"
        group, name, _ = self.key.split(".")
        return f"{group}.{name}.clients"


_NAMES = {"loss": "personalized loss", "accuracy": "personalized accuracy",
          "memory-loss": "loss adapted from memory", "memory-accuracy": "accuracy adapted from memory",
          "adapt-ms": "adaptation time (ms)",
          "memory-gap": "loss from memory minus loss from w",
          "tracking-error": "memory tracking error ||u - A(w)|| / ||A(w)||",
          "staleness": "rounds since previous participation",
          "first": "first participations", "participations": "participations",
          "bytes": "memory bytes", "clients": "clients holding a memory"}
_GROUPS = {"seen": "trained clients", "unseen": "unseen clients",
           "sampled": "sampled clients since the previous evaluation", "memory": "all clients"}
#: Groups whose statistics are not over evaluated clients (participation and memory bookkeeping).
_RUN_GROUPS = ("sampled", "memory")
_STATS = {"mean": "mean", "p50": "median", "p10": "10th pct.", "p90": "90th pct.", "std": "std",
          "max": "max", "fraction": "fraction", "count": "count", "client": "per client",
          "total": "total"}
_TRAIN_NAMES = {"loss_before": "training query loss at w",
                "loss_after": "training query loss after adaptation"}
X_LABELS = {"rounds": "round", "samples": "training samples processed",
            "bytes": "bytes communicated (up + down)", "seconds": "wall-clock time (s)"}


def axis_label(key: str) -> str:
    """Two lines for an axis: "personalized loss" / "trained clients, mean over clients"."""
    if key in _TRAIN_NAMES:
        return _TRAIN_NAMES[key].replace(" after", "\nafter").replace(" at", "\nat")
    group, name, stat = key.split(".")
    over = "" if group in _RUN_GROUPS else " over clients"
    return (f"{_NAMES.get(name, name)}\n"
            f"{_GROUPS.get(group, group)}, {_STATS.get(stat, stat)}{over}")


def client_axis_label(key: str) -> str:
    """"personalized loss per trained client" for the per-client values behind ``key``."""
    group, name = key.split(".")[:2]
    who = {"seen": "trained client", "unseen": "unseen client"}.get(group, group)
    return f"{_NAMES.get(name, name)} per {who}\n(final evaluation)"


def describe_metric(key: str) -> str:
    """``seen.loss.mean`` -> "personalized loss, trained clients (mean over clients)"."""
    if key in _TRAIN_NAMES:
        return _TRAIN_NAMES[key]
    group, name, stat = key.split(".")
    over = "" if group in _RUN_GROUPS else " over clients"
    return (f"{_NAMES.get(name, name)}, {_GROUPS.get(group, group)} "
            f"({_STATS.get(stat, stat)}{over})")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Every run directory (one with config.yaml) at or under the given paths, once, in path order.

    Run directories inside run directories count too: ``compare_with`` baselines live in
    ``<run>/baselines/<algorithm>/``. The trackers' stores (``mlruns``, ``wandb``) hold copies of
    run files, not runs, and are not searched.
    """
    found: dict[Path, None] = {}
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise CompareError(f"{path}: no such run or sweep directory")
        if not path.is_dir():
            raise CompareError(f"{path}: not a directory; give run directories or sweep "
                               "directories")
        before = len(found)
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in TRACKER_DIRS)
            if CONFIG_FILE in files:
                found.setdefault(Path(root).resolve())
        if len(found) == before:
            raise CompareError(f"{path}: holds no run directory (a directory with {CONFIG_FILE})")
    return list(found)


def named_settings(sweep_dir: Path) -> dict[str, NamedSetting]:
    """The named settings of the sweep whose manifest is in ``sweep_dir`` (none without one). The
    manifest was validated when the sweep ran; one this version cannot read names nothing."""
    import yaml

    try:
        data = yaml.safe_load((sweep_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    section = data.get("sweep") if isinstance(data, dict) else None
    settings = section.get("settings") if isinstance(section, dict) else None
    if not isinstance(settings, dict):
        return {}
    problem = None
    try:
        refs = parse_references(section.get("references"), settings, f"{sweep_dir / MANIFEST}")
    except FedmamlError as e:
        refs, problem = {}, str(e)
    return {str(n): NamedSetting(str(n), i, dict(o or {}), refs.get(str(n)), problem)
            for i, (n, o) in enumerate(settings.items()) if isinstance(o, (dict, type(None)))}


def load_run(run_dir: Path, named: dict[str, NamedSetting] | None = None) -> Run | None:
    """A finished run, or None when it has no summary.json (interrupted or still running).
    ``named``: the named settings of its sweep (:func:`named_settings`); a sweep names a run
    directory ``<setting>,...``."""
    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.exists():
        return None
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        with open(run_dir / METRICS_FILE, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise CompareError(f"{run_dir}: cannot read the run ({e})") from None
    setting = (named or {}).get(run_dir.name.split(",")[0])
    return Run(dir=run_dir, config=load_config(run_dir / CONFIG_FILE), summary=summary, rows=rows,
               named=setting)


def load_runs(paths: Sequence[str | Path]) -> tuple[list[Run], list[Path]]:
    """The finished runs under ``paths`` (completed, diverged or failed) and the unfinished run
    directories (no summary, or interrupted) that were left out."""
    runs, unfinished = [], []
    manifests: dict[Path, dict[str, NamedSetting]] = {}
    for d in find_run_dirs(paths):
        if d.parent not in manifests:
            manifests[d.parent] = named_settings(d.parent)
        run = load_run(d, manifests[d.parent])
        if run is None or run.status == "interrupted":
            unfinished.append(d)
        else:
            runs.append(run)
    if not runs:
        raise CompareError(f"no finished run (with {SUMMARY_FILE}) under "
                           f"{', '.join(map(str, paths))}; {len(unfinished)} unfinished")
    return runs, unfinished


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------

def setting_key(cfg: Config) -> tuple[tuple[str, Any], ...]:
    return tuple((k, v) for k, v in config_to_flat(cfg).items() if k not in IDENTITY_KEYS)


def _sort_value(v: Any) -> tuple[int, Any]:
    """Numbers before booleans before strings, each in natural order (so 10 sorts after 5)."""
    if isinstance(v, bool):
        return (1, v)
    if isinstance(v, (int, float)):
        return (0, v)
    return (2, str(v))


def group_settings(runs: Iterable[Run]) -> list[Setting]:
    """Runs grouped by config up to the seed, sorted by the values in which settings differ, and
    labelled by those values (``beta=0.3, federated.mode=cross_silo``; algorithms by name alone).
    Runs of a named setting are labelled by its name (``MOML``, then the grid values it does not
    set: ``MOML, support_size=3``) and come first, in the sweep's order."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        name = run.named.name if run.named else None
        groups.setdefault((name, setting_key(run.config)), []).append(run)
    settings = [Setting(runs=sorted(rs, key=lambda r: (r.seed, str(r.dir))), named=rs[0].named)
                for rs in groups.values()]
    # With one key per entry of a mapping key (algorithm.kwargs.lam): a sweep over an entry is
    # labelled by it, as its run directories are named; the mapping itself then goes unsaid.
    flats = [with_entries(dict(k[1])) for k in groups]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    varying = [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]
    varying = [k for k in varying if not any(v.startswith(k + ".") for v in varying)]
    # The keys that named settings set are said by their names; the label adds the other values.
    named_keys = {k for s in settings if s.named for k in s.named.overrides}
    for s, flat in zip(settings, flats):
        s.values = {k: flat.get(k) for k in varying}
        parts = [_label_part(k, v) for k, v in s.values.items()
                 if not (s.named and _named_key(k, named_keys)) and k in flat]
        if s.named:
            s.label = ", ".join([s.named.name, *parts])
        else:
            s.label = ", ".join(parts) or s.config.algorithm.name
    settings.sort(key=lambda s: ((0, s.named.index) if s.named else (1, 0),
                                 tuple(_sort_value(v) for v in s.values.values())))
    return settings


def _named_key(key: str, named_keys: set[str]) -> bool:
    """``key`` is set by named settings: itself, or the mapping key it is an entry of."""
    return key in named_keys or any(key.startswith(n + ".") for n in named_keys)


def _label_part(key: str, value: Any) -> str:
    if key == "algorithm.name":
        return str(value)
    if isinstance(value, bool):
        value = "true" if value else "false"
    return f"{short_key(key)}={value}"


# --------------------------------------------------------------------------------------------------
# Metrics and comparability
# --------------------------------------------------------------------------------------------------

def eval_keys(run: Run) -> set[str]:
    """Scalar evaluation keys the run recorded (``seen.loss.mean``...), over all its rows."""
    keys: set[str] = set()
    for row in run.rows:
        keys.update(k for k, v in row.get("eval", {}).items()
                    if k.count(".") == 2 and not k.endswith(".clients"))
    return keys


def resolve_metric(spec: str | None, runs: Sequence[Run]) -> Metric:
    """``--metric``: a full evaluation key (``unseen.accuracy.p50``), one without the statistic
    (``seen.memory-loss`` = its mean), a bare name (``loss`` = ``seen.loss.mean``), or a training key
    (``loss_after``). Default: the runs' task metric on trained clients, ``seen.<loss|accuracy>.mean``.
    """
    task = runs[0].summary.get("metric", "loss")
    text = spec or task
    key = metric_key(text)
    if key in TRAIN_METRICS:
        return Metric(key, higher_is_better=False)
    parts = key.split(".")
    available = set.intersection(*(eval_keys(r) for r in runs))
    if key not in set.union(*(eval_keys(r) for r in runs)):
        listing = ", ".join(sorted(available | set(TRAIN_METRICS)))
        raise CompareError(f"--metric {text!r}: no run recorded {key!r}; available: {listing}")
    return Metric(key, higher_is_better="accuracy" in parts[1])


def check_comparable(runs: Sequence[Run], metric: Metric) -> None:
    """Refuse runs that measure different things; the message names the runs on each side."""
    def by(value_of: Any) -> dict[Any, list[Run]]:
        out: dict[Any, list[Run]] = {}
        for r in runs:
            out.setdefault(value_of(r), []).append(r)
        return out

    def sides(groups: dict[Any, list[Run]]) -> str:
        return "; ".join(f"{v!r}: {_some_dirs(rs)}" for v, rs in groups.items())

    metrics = by(lambda r: r.summary.get("metric"))
    if len(metrics) > 1:
        raise CompareError("these runs measure different metrics (regression loss vs "
                           f"classification accuracy) and cannot share a plot: {sides(metrics)}")
    families = by(lambda r: r.config.data.family)
    if len(families) > 1:
        raise CompareError("these runs solve different task families (data.family), so their "
                           f"numbers are not comparable: {sides(families)}; compare each family "
                           "separately")
    if metric.is_train:
        missing = [r for r in runs if not any(metric.key in row for row in r.rows)]
    else:
        missing = [r for r in runs if metric.key not in eval_keys(r)]
    if missing:
        raise CompareError(f"--metric {metric.key!r}: missing in {len(missing)} of {len(runs)} runs "
                           f"({_some_dirs(missing)}); pick a metric that every run records "
                           "(e.g. unseen.* needs data.unseen_clients > 0, memory-* needs "
                           "evaluation.from_memory)")


def evaluation_differences(settings: Sequence[Setting]) -> list[str]:
    """Keys in which settings differ that change how the metric is measured (a warning, not an
    error: comparing them can be the point, but a reader must know)."""
    keys = settings[0].values.keys() if settings else []
    return [k for k in keys if k.startswith("evaluation.") or k in EVALUATION_KEYS]


def _some_dirs(runs: Sequence[Run], limit: int = 3) -> str:
    names = [str(r.dir) for r in runs[:limit]]
    return ", ".join(names) + (f" and {len(runs) - limit} more" if len(runs) > limit else "")


# --------------------------------------------------------------------------------------------------
# Curves and numbers
# --------------------------------------------------------------------------------------------------

def batch_size(run: Run) -> int:
    """How many runs trained together with this one in a vectorized batch (1: it ran alone). Their
    ``seconds`` are the batch's wall time, shared by all of them (summary.json's ``batch``)."""
    batch = run.summary.get("batch")
    return max(1, int(batch.get("runs", 1))) if isinstance(batch, dict) else 1


def run_seconds(run: Run) -> float:
    """A run's wall time; for a run of a vectorized batch, its share: the batch's wall time divided
    by the batch's runs (the batch's time itself would read as each run's, N times over)."""
    return float(run.summary.get("seconds") or math.nan) / batch_size(run)


def _x_value(row: dict[str, Any], x: str, share: int = 1) -> float:
    if x == "rounds":
        return float(row["round"])
    if x == "bytes":
        return float(row.get("bytes_up", 0) + row.get("bytes_down", 0))
    if x == "seconds":
        return float(row.get(x, 0)) / share
    return float(row.get(x, 0))


def run_points(run: Run, metric: Metric) -> dict[int, tuple[dict[str, Any], float]]:
    """round -> (its metrics row, metric value), for the rounds where the metric was recorded
    (NaN where it was recorded as null: a diverged run)."""
    out = {}
    for row in run.rows:
        source = row if metric.is_train else row.get("eval", {})
        if metric.key in source:
            value = source[metric.key]
            out[int(row["round"])] = (row, math.nan if value is None else float(value))
    return out


@dataclass
class Curve:
    x: np.ndarray  # seed-mean of the x quantity at each common round
    mean: np.ndarray
    low: np.ndarray  # band
    high: np.ndarray
    n: int  # runs


def setting_curve(setting: Setting, metric: Metric, x: str, band: str = "std") -> Curve:
    """The metric at the rounds every seed recorded: mean over seeds and a band (std, standard error
    or min-max over seeds). With ``x`` other than rounds, a point's x is the seed-mean at that round."""
    points = [run_points(r, metric) for r in setting.runs]
    rounds = sorted(set.intersection(*(set(p) for p in points)))
    xs = np.array([[_x_value(p[rd][0], x, batch_size(r)) for rd in rounds]
                   for r, p in zip(setting.runs, points)])
    ys = np.array([[p[rd][1] for rd in rounds] for p in points])
    n = len(points)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rounds (diverged) become gaps
        mean = np.nanmean(ys, axis=0)
        if n == 1:
            low = high = mean
        elif band == "minmax":
            low, high = np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)
        else:
            spread = np.nanstd(ys, axis=0, ddof=1)
            if band == "sem":
                spread = spread / math.sqrt(n)
            low, high = mean - spread, mean + spread
    return Curve(x=xs.mean(axis=0), mean=mean, low=low, high=high, n=n)


@dataclass
class Stat:
    """A number over seeds: the per-seed values, their mean and sample standard deviation.

    ``shared``: the values are one measurement repeated, not one per seed (every run of a setting
    trained in one vectorized batch and records its share of the batch's wall time), so there is no
    spread over seeds to state: ``std`` is NaN rather than a 0 that would read as a measured one.
    """

    values: list[float]
    shared: bool = False

    @property
    def mean(self) -> float:
        finite = [v for v in self.values if not math.isnan(v)]
        return float(np.mean(finite)) if finite else math.nan

    @property
    def std(self) -> float:
        finite = [v for v in self.values if not math.isnan(v)]
        return float(np.std(finite, ddof=1)) if len(finite) > 1 and not self.shared else math.nan

    @property
    def n(self) -> int:
        """The values behind the mean (NaN ones, of runs without a value, left out)."""
        return sum(not math.isnan(v) for v in self.values)


@dataclass
class SettingStats:
    runs: int
    before: Stat  # the evaluation at round 0, before training (NaN: none at round 0)
    final: Stat
    best: Stat
    # First evaluated round at which the seed-mean curve (the line of the figure) reaches the
    # target, and the seed-mean samples processed by then; NaN when it never does.
    rounds_to_target: float
    samples_to_target: float
    seconds: Stat  # per run; a batched run's share of its batch (run_seconds), shared by a batch
    bytes: Stat
    samples: Stat
    batched: int = 0  # runs that trained in a vectorized batch


def reaches(value: float, target: float, metric: Metric) -> bool:
    return value >= target if metric.higher_is_better else value <= target


def default_target(settings: Sequence[Setting], metric: Metric) -> float:
    """The least good final mean among the settings: the level every setting's mean curve ends at
    or beyond, so "rounds to target" says how fast each got there."""
    finals = [setting_stats(s, metric, math.nan).final.mean for s in settings]
    finals = [f for f in finals if not math.isnan(f)]
    if not finals:
        return math.nan
    return min(finals) if metric.higher_is_better else max(finals)


def setting_stats(setting: Setting, metric: Metric, target: float) -> SettingStats:
    """Final and best value (per seed, then mean and std over seeds), time to ``target`` on the
    seed-mean curve, wall time, bytes and samples.

    Time to target uses the mean curve rather than each seed's own: when seeds differ in level (the
    seed also draws the clients' tasks), some seeds start below any sensible target and others never
    get there, and a per-seed count would say more about the seeds than about the setting.
    """
    before, final, best, secs, nbytes, nsamples = [], [], [], [], [], []
    for run in setting.runs:
        points = run_points(run, metric)
        values = [v for _, (_, v) in sorted(points.items())]
        # round 0 only: a metric first recorded later (memories, training losses) has no value
        # before training, and its first value would be a trained one
        before.append(points[0][1] if 0 in points else math.nan)
        final.append(values[-1] if values else math.nan)
        finite = [v for v in values if not math.isnan(v)]
        best.append((max(finite) if metric.higher_is_better else min(finite)) if finite else math.nan)
        secs.append(run_seconds(run))
        last = run.rows[-1] if run.rows else {}
        nbytes.append(float(last.get("bytes_up", 0) + last.get("bytes_down", 0)))
        nsamples.append(float(last.get("samples", 0)))
    by_round = setting_curve(setting, metric, "rounds")
    by_samples = setting_curve(setting, metric, "samples")
    hit = next((i for i, v in enumerate(by_round.mean)
                if not math.isnan(target) and not math.isnan(v) and reaches(v, target, metric)), None)
    return SettingStats(
        runs=len(setting.runs), before=Stat(before), final=Stat(final), best=Stat(best),
        rounds_to_target=math.nan if hit is None else float(by_round.x[hit]),
        samples_to_target=math.nan if hit is None else float(by_samples.x[hit]),
        seconds=Stat(secs, shared=_one_batch(setting.runs, secs)), bytes=Stat(nbytes),
        samples=Stat(nsamples), batched=sum(batch_size(r) > 1 for r in setting.runs))


def _one_batch(runs: Sequence[Run], seconds: Sequence[float]) -> bool:
    """Several runs that trained in vectorized batches and record the same share of a batch's wall
    time: one batch's clock, measured once for all of them."""
    return (len(runs) > 1 and all(batch_size(r) > 1 for r in runs)
            and len(set(seconds)) == 1 and not math.isnan(seconds[0]))


def final_client_values(setting: Setting, metric: Metric) -> list[list[float]]:
    """Per-client values of the personalized metric at each run's last evaluation: one list per run
    (seed), in the setting's order; empty for a run that recorded none. The figure pools them (each
    run evaluates the same clients only if its seed says so; pooling keeps them all) and says how
    many clients and seeds it pooled."""
    key = metric.clients_key(setting.runs[0].summary.get("metric", "loss"))
    per_run: list[list[float]] = []
    for run in setting.runs:
        rows = [r for r in run.rows if key in r.get("eval", {})]
        per_run.append([float(v) for v in rows[-1]["eval"][key] if v is not None] if rows else [])
    return per_run


# --------------------------------------------------------------------------------------------------
# The whole comparison
# --------------------------------------------------------------------------------------------------

def shown_references(settings: Sequence[Setting], metric: Metric
                     ) -> tuple[list[Reference | None], list[str]]:
    """The reference shown beside each setting (``sweep.references``): only one that says it is a
    value of the compared metric, since beside another metric (a training loss, another group of
    clients) it would read as the same quantity; and the remarks for the table's legend: the
    references left out and why, and settings trained to another budget than their reference
    states (its ``rounds``)."""
    shown: list[Reference | None] = []
    other: dict[str, list[str]] = {}  # metric -> names of settings whose reference is of it
    unstated: list[str] = []
    remarks: list[str] = []
    for problem in dict.fromkeys(s.named.reference_problem for s in settings if s.named):
        if problem:
            remarks.append(f"no reference is shown: {problem}")
    for s in settings:
        ref = s.named.reference if s.named else None
        if ref is None or ref.metric != metric.key:
            shown.append(None)
            if s.named and ref is not None:
                (other.setdefault(ref.metric, []) if ref.metric else unstated).append(s.named.name)
            continue
        shown.append(ref)
        trained = s.config.federated.rounds
        if ref.rounds and trained not in ref.rounds:
            remarks.append(f"{s.label} trained {counted(trained, 'round')}; "
                           f"its reference is for {' or '.join(f'{r:,}' for r in ref.rounds)} "
                           "(its `rounds` in sweep.references): another budget, so the numbers "
                           "are not comparable")
    for key, names in other.items():
        names = list(dict.fromkeys(names))
        remarks.append(f"the references of {', '.join(names)} are values of {key}, not of "
                       f"{metric.key}: not shown (--metric {key} shows them)")
    if unstated:
        names = list(dict.fromkeys(unstated))
        remarks.append(f"the references of {', '.join(names)} do not say which metric they are "
                       "values of: not shown (give each its `metric` in sweep.references)")
    return shown, remarks


@dataclass
class Comparison:
    """What ``fedmaml compare`` shows, computed once (:func:`build_comparison`); the figures, the
    report and every table format render it.

    ``settings`` and ``stats`` are aligned (one :class:`SettingStats` per :class:`Setting`, in the
    table's order), as is ``references`` (the reference shown beside each setting, or None).
    ``target`` is the level of "rounds to target" (``target_is_default``: the least good final mean,
    not ``--target``). ``notes``: what a reader must know (runs left out, evaluations that differ,
    vectorized wall times); ``reference_notes``: the table's remarks on its references (those not
    shown and why, budgets that differ from the reference's)."""

    settings: list[Setting]
    metric: Metric
    task_metric: str  # "loss" or "accuracy"
    target: float
    target_is_default: bool
    stats: list[SettingStats]
    unfinished: list[Path]
    notes: list[str]
    references: list[Reference | None] = field(default_factory=list)
    reference_notes: list[str] = field(default_factory=list)


def build_comparison(paths: Sequence[str | Path], metric: str | None = None,
                     target: float | None = None) -> Comparison:
    """The comparison of the runs under ``paths``, as ``fedmaml compare`` computes it, without
    writing anything: the Python entry point to its numbers.

    ``paths``: run directories, or directories holding them (a sweep directory, ``results/``, a run
    with ``compare_with`` baselines), searched recursively. ``metric``: as ``--metric`` takes it
    (``unseen.loss`` means ``unseen.loss.mean``; ``loss_after``; None: the runs' task metric on
    trained clients). ``target``: the level of "rounds to target" (None: the least good final mean
    among the settings).

    Runs are grouped into settings (configs equal up to the seed; a sweep's named settings by their
    names), completed runs make the numbers, and runs that diverged or failed, or are unfinished,
    are left out with a note. The returned :class:`Comparison` holds, in the table's order, each
    :class:`Setting` (label, runs, the config values in which settings differ), its
    :class:`SettingStats` (before training, final and best value, wall time, bytes and samples as
    :class:`Stat`: per-seed values, mean, sample std, n; rounds and samples to target) and the
    reference shown beside it, with the notes. Every output renders this one object: the figures
    (compare_plots.py), the Markdown report (compare_report.py), and the CSV, LaTeX and JSON tables
    (compare_tables.py; ``table_records(c)`` gives the rows as dicts)::

        from fedmaml.results.compare import build_comparison
        from fedmaml.results.compare_tables import table_json

        c = build_comparison(["results/moml_miniature"], metric="unseen.loss")
        for setting, stats in zip(c.settings, c.stats):
            print(setting.label, stats.final.mean, stats.final.std, stats.final.n)
        text = table_json(c)

    Raises :class:`CompareError` when there is nothing to compare (no finished run) or the runs
    cannot be compared (different task metrics or families, a metric some run lacks), naming the
    runs on each side.
    """
    all_runs, unfinished = load_runs(paths)
    runs = [r for r in all_runs if r.status == "completed"]
    if not runs:
        raise CompareError(f"no completed run under {', '.join(map(str, paths))}: "
                           + ", ".join(f"{r.dir} {r.status}" for r in all_runs[:5])
                           + (" ..." if len(all_runs) > 5 else ""))
    m = resolve_metric(metric, runs)
    check_comparable(runs, m)
    settings, notes = [], []
    for s in group_settings(all_runs):  # labels see every run; numbers only the completed ones
        s.incomplete = [r for r in s.runs if r.status != "completed"]
        s.runs = [r for r in s.runs if r.status == "completed"]
        if s.incomplete:
            notes.append(f"{s.label}: {s.incomplete_text()}; left out of its numbers "
                         f"({len(s.runs)} of {len(s.runs) + len(s.incomplete)} runs completed)")
        if s.runs:
            settings.append(s)
    if unfinished:
        notes.append(f"left out {len(unfinished)} unfinished run(s) (no {SUMMARY_FILE}, or "
                     "interrupted): " + ", ".join(str(d) for d in unfinished[:5])
                     + (" ..." if len(unfinished) > 5 else ""))
    differ = evaluation_differences(settings)
    if differ:
        notes.append("the settings differ in how they are evaluated ("
                     + ", ".join(differ) + "): their numbers measure different things")
    for s in settings:
        seeds = [r.seed for r in s.runs]
        if len(set(seeds)) < len(seeds):
            notes.append(f"{s.label}: {len(seeds)} runs but only {len(set(seeds))} distinct seeds "
                         "(repeated runs of one seed narrow the band artificially)")
    default = target is None
    tgt = default_target(settings, m) if default else float(target)
    stats = [setting_stats(s, m, tgt) for s in settings]
    batched = sum(st.batched for st in stats)
    if batched:
        notes.append(f"wall time of the {batched} run(s) that trained in vectorized batches "
                     "(`fedmaml sweep --vectorize`, marked *) is the batch's wall time divided by "
                     "its runs; a batch also carries its own start (the first of a process the "
                     "imports and warm-up), so compare it between runs that ran the same way")
    references, reference_notes = shown_references(settings, m)
    return Comparison(settings=settings, metric=m, task_metric=runs[0].summary.get("metric", "loss"),
                      target=tgt, target_is_default=default, stats=stats, unfinished=unfinished,
                      notes=notes, references=references, reference_notes=reference_notes)
