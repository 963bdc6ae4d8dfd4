"""``fedmaml tune``: ask a batch of candidates, train candidates x seeds as one vectorized
computation through the rungs of successive halving, tell the results, repeat within the budget;
then choose robustly and write the tuned config and the report (docs/tuning.md).

Layout of a tuning directory::

    <tune dir>/
      tune.json        the manifest: base config and the tuning spec (a rerun must match it)
      ledger.json      every candidate asked (id, setting, batch, values), written before it trains,
                       and the wall time spent so far
      trials/          one run directory per candidate and seed, named as `fedmaml sweep` names
                       them (`beta=0.3,eta=0.01,seed=100`), with a sweep manifest (compare, tracking)
      tuned.yaml       the chosen config (tuned-<setting>.yaml with named settings)
      report.md, report.json, search.png (search-<setting>.png)

Everything is resumable: a killed tuning run continues from the ledger and the runs' checkpoints
(a batch stopped at a rung, or by Ctrl-C / SIGTERM, checkpoints every run), and finished runs are
reused, as in a sweep.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fedmaml.atomic import atomic_write_text
from fedmaml.config import Config, config_to_flat, dump_yaml, parse_override, replace_paths
from fedmaml.errors import ConfigError, FedmamlError
from fedmaml.results.run_files import read_summary
from fedmaml.run_dir import DirectoryLock
from fedmaml.sweep import (ERROR_FILE, SweepSpec, run_name, run_state, strip_source,
                           write_manifest)
from fedmaml.tune.halving import promoted, rungs_for
from fedmaml.tune.metric import Metric
from fedmaml.tune.search import Search, make_search
from fedmaml.tune.selection import RISE, Candidate, Choice, SeedResult, choose
from fedmaml.tune.space import Space

MANIFEST = "tune.json"
LEDGER = "ledger.json"
TRIALS = "trials"
LOCK_FILE = ".tune.lock"
#: Manifest entries a rerun may change: the budget may grow (more candidates are asked).
_MAY_CHANGE = ("trials",)


@dataclass(frozen=True)
class TuneSpec:
    """What a tuning run searches, on which seeds, how it measures and how it chooses."""

    space: Space
    seeds: tuple[int, ...]
    metric: Metric
    search: str = "grid"
    trials: int | None = None  # candidates per setting; None: the whole grid (grid search only)
    batch: int | None = None  # candidates trained at once; None: the whole budget at once
    grid_points: int = 5
    rungs: int = 1  # successive halving rungs (1: off)
    reduction: float = 3.0
    rise: float = RISE
    sampler_seed: int = 0
    tuned_set: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"space": self.space.to_json(), "seeds": list(self.seeds),
                "metric": self.metric.text, "direction": self.metric.direction,
                "search": self.search, "trials": self.trials, "batch": self.batch,
                "grid_points": self.grid_points, "rungs": self.rungs,
                "reduction": self.reduction, "rise": self.rise,
                "sampler_seed": self.sampler_seed, "tuned_set": dict(self.tuned_set),
                "settings": {k: dict(v) for k, v in self.settings.items()}}


@dataclass
class SettingResult:
    setting: str | None
    choice: Choice
    rungs: list[int]
    tuned_path: Path | None
    rounds_trained: int  # run-rounds trained by the candidates' runs (all seeds)
    figure: Path | None = None


@dataclass
class TuneResult:
    tune_dir: Path
    settings: list[SettingResult]
    seconds: float  # wall time of every invocation so far
    report: Path | None = None


def check_spec(base: Config, spec: TuneSpec) -> list[int]:
    """Refuse what cannot be tuned (with the reason); return the rungs."""
    from fedmaml.engines.batch_plan import batch_refusal

    if len(spec.seeds) < 2:
        raise ConfigError(f"--seeds {','.join(map(str, spec.seeds))}: a candidate must run on at "
                          "least 2 seeds (a value that is stable on one seed may collapse on the "
                          "next: docs/tuning.md); e.g. --seeds 100,101")
    if spec.search == "grid" and spec.trials is not None:
        raise ConfigError("--trials: a grid search tries every point of the grid; leave --trials "
                          "out, or use --search random or tpe with a budget")
    if spec.search != "grid" and not spec.trials:
        raise ConfigError(f"--search {spec.search} needs a budget: --trials N (candidates per "
                          "setting, each trained on every seed)")
    if spec.batch is not None and spec.batch < 1:
        raise ConfigError(f"--batch {spec.batch}: must be at least 1")
    if spec.rise <= 1:
        raise ConfigError(f"--rise {spec.rise:g}: must be above 1 (1.2: a final value 20 % worse "
                          "than the best after half the budget excludes a candidate)")
    why = batch_refusal(base)
    if why is not None:
        raise ConfigError(f"fedmaml tune trains its trials as vectorized batches, which this config "
                          f"cannot join: {why} (fedmaml/engines/run_batch.py)")
    fed = base.federated
    return rungs_for(fed.rounds, fed.eval_every, spec.rungs, spec.reduction)


def train_part(configs: list[Config], dirs: list[Path], quiet: bool, until: int | None
               ) -> list[tuple[float, str | None]]:
    """One vectorized batch to round ``until`` (None: to the end), here or in a worker process.
    A run stopped at a rung logs that it was interrupted: expected here, so not a warning."""
    from fedmaml.sweep import execute_one_batch

    logger = logging.getLogger("fedmaml")
    level = logger.level
    if until is not None:
        logger.setLevel(logging.ERROR)
    try:
        return execute_one_batch(configs, dirs, quiet=quiet, until_round=until)
    finally:
        logger.setLevel(level)


def default_tune_dir(base: Config) -> Path:
    return Path(base.output_dir) / f"{base.name}-tune"


# --------------------------------------------------------------------------------------------------
# The manifest and the ledger
# --------------------------------------------------------------------------------------------------

def _check_manifest(tune_dir: Path, base: Config, spec: TuneSpec) -> None:
    """Write the manifest, or check that the one there describes the same tuning run."""
    path = tune_dir / MANIFEST
    now = {"base": config_to_flat(base), "spec": spec.to_json()}
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = [f"config {k}: {old['base'].get(k)!r} there, {v!r} now"
                for k, v in now["base"].items() if old["base"].get(k) != v
                and k not in ("output_dir", "name") and not k.startswith("tracking.")]
        diff += [f"{k}: {old['spec'].get(k)!r} there, {v!r} now"
                 for k, v in now["spec"].items() if old["spec"].get(k) != v and k not in _MAY_CHANGE]
        if diff:
            raise FedmamlError(f"{tune_dir}: holds another tuning run ({'; '.join(diff[:4])}"
                               f"{'; ...' if len(diff) > 4 else ''}); give another --tune-dir, or "
                               "the same arguments to continue it (only --trials may grow)")
    atomic_write_text(path, json.dumps(now, indent=1) + "\n")


def _load_ledger(tune_dir: Path) -> dict[str, Any]:
    path = tune_dir / LEDGER
    if not path.exists():
        return {"candidates": [], "seconds": 0.0}
    return json.loads(path.read_text(encoding="utf-8"))


def _save_ledger(tune_dir: Path, ledger: dict[str, Any]) -> None:
    atomic_write_text(tune_dir / LEDGER, json.dumps(ledger, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------
# Runs of a candidate
# --------------------------------------------------------------------------------------------------

@dataclass
class _Run:
    candidate: int
    seed: int
    config: Config
    dir: Path

    def progress(self) -> tuple[int, str | None]:
        """``(rounds done, status)``: the status of a run that ended (completed, diverged, failed;
        interrupted: stopped at a rung), None for one still to train or train on."""
        from fedmaml.federated.checkpoint import CHECKPOINT_FILE, load

        summary = read_summary(self.dir)
        status = summary.get("status") if summary else None
        if status in ("completed", "diverged", "failed"):
            return int(summary.get("rounds_completed") or 0), status
        if (self.dir / CHECKPOINT_FILE).exists():
            return int(load(self.dir)["round"]), ("interrupted" if status else None)
        if (self.dir / ERROR_FILE).exists():
            return 0, "failed"
        return 0, None


class Tuner:
    """One tuning run (every setting) into ``tune_dir``."""

    def __init__(self, base: Config, spec: TuneSpec, tune_dir: str | Path | None = None,
                 quiet: bool = False, stream: TextIO | None = None, jobs: int = 1) -> None:
        # Trials train without compare_with baselines (a run's own comparison, not part of the
        # choice: training them would only cost time); the tuned config keeps them.
        self.tuned_base = base
        if base.compare_with:
            base = replace_paths(base, {"compare_with": parse_override("compare_with=")[1]})
        self.base, self.spec = base, spec
        self.dir = Path(tune_dir) if tune_dir is not None else default_tune_dir(base)
        self.trials = self.dir / TRIALS
        self.quiet, self.out = quiet, stream or sys.stderr
        self.jobs = max(1, jobs)  # processes training a rung's batches
        self.rungs = check_spec(base, spec)
        self.budget = base.federated.rounds

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.out, flush=True)

    def run(self) -> TuneResult:
        start = time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True)
        with DirectoryLock(self.dir, LOCK_FILE, "fedmaml tune",
                           "wait for it or use another --tune-dir"):
            _check_manifest(self.dir, self.base, self.spec)
            self.ledger = _load_ledger(self.dir)
            spent = float(self.ledger.get("seconds", 0.0))
            results = []
            try:
                for setting in (list(self.spec.settings) or [None]):
                    results.append(self._tune_setting(setting))
            finally:
                self.ledger["seconds"] = spent + time.perf_counter() - start
                _save_ledger(self.dir, self.ledger)
            result = TuneResult(self.dir, results, self.ledger["seconds"])
            from fedmaml.tune.report import write_report

            result.report = write_report(self, result)
        return result

    # -- one setting --------------------------------------------------------------------------------
    def _tune_setting(self, setting: str | None) -> SettingResult:
        spec = self.spec
        search = make_search(spec.search, spec.space, spec.metric.direction, spec.sampler_seed,
                             spec.grid_points)
        mine = [c for c in self.ledger["candidates"] if c["setting"] == setting]
        for c in mine:
            search.note_asked(c["params"])
        budget = spec.trials if spec.trials is not None else search.size()  # type: ignore[attr-defined]
        batch_size = spec.batch or budget
        rung_scores: list[dict[int, float]] = [{} for _ in self.rungs]
        candidates: list[Candidate] = []
        rounds_trained = 0
        label = f"setting {setting}: " if setting else ""
        b = 0
        while True:
            members = [c for c in mine if c["batch"] == b]
            if not members:
                asked = len(mine)
                if asked >= budget or search.exhausted():
                    break
                new = search.ask(min(batch_size, budget - asked))
                if not new:
                    break
                first = len(self.ledger["candidates"])
                members = [{"id": first + i, "setting": setting, "batch": b, "params": p}
                           for i, p in enumerate(new)]
                self.ledger["candidates"] += members
                mine += members
                _save_ledger(self.dir, self.ledger)  # before training: a restart trains the same
                self._write_sweep_manifest()
            self.say(f"{label}batch {b + 1}: {len(members)} candidate(s) x {len(spec.seeds)} "
                     f"seed(s)")
            done, trained = self._train_batch(setting, members, rung_scores, search)
            candidates += done
            rounds_trained += trained
            b += 1
        choice = choose(candidates, self.budget, spec.metric.direction, spec.rise,
                        spec.space.edges)
        tuned = self._write_tuned(setting, choice)
        return SettingResult(setting, choice, self.rungs, tuned, rounds_trained)

    def _runs_of(self, setting: str | None, cand: Mapping[str, Any]) -> list[_Run] | str:
        """The runs of a candidate (one per seed), or why its values make no valid config."""
        overrides = {**(self.spec.settings.get(setting, {}) if setting else {}), **cand["params"]}
        try:
            with_values = replace_paths(self.base, overrides)
        except ConfigError as e:
            return f"invalid: {strip_source(e)}"
        runs = []
        for seed in self.spec.seeds:
            name = run_name(cand["params"], seed, setting)
            cfg = replace_paths(with_values, {"seed": seed, "name": name,
                                              "output_dir": str(self.trials)})
            runs.append(_Run(cand["id"], seed, cfg, self.trials / name))
        return runs

    def _train_batch(self, setting: str | None, members: list[dict[str, Any]],
                     rung_scores: list[dict[int, float]], search: Search
                     ) -> tuple[list[Candidate], int]:
        """Train a batch's candidates through the rungs (resuming what ran before); tell the
        search each outcome. Returns the candidates with their runs' results and the run-rounds
        they trained."""
        from fedmaml.engines.batch_plan import batch_key

        runs_of: dict[int, list[_Run]] = {}
        invalid: dict[int, str] = {}
        for c in members:
            r = self._runs_of(setting, c)
            if isinstance(r, str):
                invalid[c["id"]] = r
            else:
                runs_of[c["id"]] = r
                for run in r:
                    run_state(run.dir, run.config)  # a finished run of another config: an error
        alive = list(runs_of)
        rung_values: dict[int, dict[int, float]] = {i: {} for i in runs_of}
        for k, rung in enumerate(self.rungs):
            todo = [run for i in alive for run in runs_of[i] if self._needs(run, rung)]
            groups: dict[tuple, list[_Run]] = {}
            for run in todo:
                groups.setdefault((batch_key(run.config), run.progress()[0]), []).append(run)
            if groups:
                self._train([(at, g) for (_, at), g in groups.items()], rung)
            scores = {i: self._rung_score(runs_of[i], rung) for i in alive}
            for i, v in scores.items():
                rung_values[i][rung] = v
            rung_scores[k].update(scores)
            if k < len(self.rungs) - 1:
                keep = promoted(alive, rung_scores[k], self.spec.reduction,
                                self.spec.metric.direction)
                self.say(f"  rung {k + 1} (round {rung}): {len(keep)} of {len(alive)} "
                         "candidate(s) go on")
                alive = keep
        out, trained = [], 0
        for c in members:
            if c["id"] in invalid:
                cand = Candidate(c["id"], c["params"], [], setting)
                cand.extra["invalid"] = invalid[c["id"]]
                search.tell(c["params"], None, "fail")
                out.append(cand)
                continue
            results = []
            for run in runs_of[c["id"]]:
                done, status = run.progress()
                trained += done
                curve = self.spec.metric.curve(run.dir) if (run.dir / "metrics.jsonl").exists() \
                    else []
                results.append(SeedResult(run.seed, status or "interrupted", done, curve))
            cand = Candidate(c["id"], c["params"], results, setting)
            cand.extra["rungs"] = rung_values[c["id"]]
            out.append(cand)
            finals = [r.final for r in results]
            if all(r.status == "completed" for r in results) and all(map(math.isfinite, finals)):
                search.tell(c["params"], sum(finals) / len(finals), "complete")
            elif any(r.status in ("diverged", "failed") for r in results):
                search.tell(c["params"], None, "fail")
            else:
                search.tell(c["params"], None, "pruned",
                            {r: v for r, v in rung_values[c["id"]].items() if math.isfinite(v)})
        return out, trained

    def _needs(self, run: _Run, rung: int) -> bool:
        done, status = run.progress()
        return status in (None, "interrupted") and done < rung

    def _train(self, groups: list[tuple[int, list[_Run]]], rung: int) -> None:
        """Train every group (runs of one shape, all after round ``at``) to ``rung``: split so
        that ``jobs`` processes all get work (a bigger batch is cheaper per run, so no further),
        in worker processes when there are several parts."""
        from fedmaml.sweep import _run_pool

        until = rung if rung < self.budget else None
        split = max(1, math.ceil(self.jobs / len(groups))) if groups else 1
        work = []
        for at, runs in groups:
            n = min(split, len(runs))
            for part in (runs[i::n] for i in range(n)):
                self.say(f"  training {len(part)} run(s) from round {at} to {rung}")
                work.append((train_part, ([r.config for r in part], [r.dir for r in part],
                                          self.quiet or len(groups) * n > 1, until), part))

        def record(part: list[_Run], outcomes: Any) -> None:
            outcomes = outcomes if isinstance(outcomes, list) else [outcomes] * len(part)
            for run, (_, error) in zip(part, outcomes):
                if error:
                    self.say(f"  {run.dir.name} failed: {error}")

        if self.jobs <= 1 or len(work) <= 1:
            for fn, args, part in work:
                record(part, fn(*args))
        else:
            _run_pool(work, min(self.jobs, len(work)), record)

    def _rung_score(self, runs: list[_Run], rung: int) -> float:
        """The mean over seeds of the metric at the last evaluation up to ``rung``; NaN when a run
        diverged or failed, or was not measured."""
        values = []
        for run in runs:
            done, status = run.progress()
            if status in ("diverged", "failed"):
                return math.nan
            curve = self.spec.metric.curve(run.dir, until=rung) \
                if (run.dir / "metrics.jsonl").exists() else []
            if not curve:
                return math.nan
            values.append(curve[-1][1])
        return sum(values) / len(values)

    # -- outputs ------------------------------------------------------------------------------------
    def _write_sweep_manifest(self) -> None:
        """trials/sweep.yaml: the keys searched, as a sweep's grid (their values asked so far), so
        that experiment tracking and `fedmaml compare` see each trial's hyperparameters."""
        values: dict[str, list[Any]] = {}
        for c in self.ledger["candidates"]:
            for k, v in c["params"].items():
                if v not in values.setdefault(k, []):
                    values[k].append(v)
        self.trials.mkdir(parents=True, exist_ok=True)
        write_manifest(self.trials, self.base, SweepSpec(
            grid={k: tuple(v) for k, v in values.items()}, seeds=self.spec.seeds,
            settings=self.spec.settings))

    def tuned_config(self, setting: str | None, choice: Choice) -> Config | None:
        if choice.chosen is None:
            return None
        name = f"{self.base.name}-{setting}-tuned" if setting else f"{self.base.name}-tuned"
        overrides = {**(self.spec.settings.get(setting, {}) if setting else {}),
                     **choice.chosen.params, **self.spec.tuned_set, "name": name}
        return replace_paths(self.tuned_base, overrides)

    def _write_tuned(self, setting: str | None, choice: Choice) -> Path | None:
        cfg = self.tuned_config(setting, choice)
        path = self.dir / (f"tuned-{setting}.yaml" if setting else "tuned.yaml")
        if cfg is None:
            path.unlink(missing_ok=True)  # an earlier choice no longer stands
            return None
        c = choice.chosen
        assert c is not None
        header = [f"# Tuned by fedmaml tune ({self.dir}): {self.spec.metric.text} "
                  f"({self.spec.metric.direction}) on seeds "
                  f"{','.join(map(str, self.spec.seeds))}, {self.spec.search} search.",
                  f"# {choice.describe()}",
                  f"# mean {c.score:.6g} over the seeds (std {c.spread:.3g}); report: "
                  f"{self.dir / 'report.md'}"]
        text = "\n".join(h.replace("\n", " ") for h in header) + "\n" + dump_yaml(cfg)
        atomic_write_text(path, text)
        return path
