"""``run_experiment``: one config -> one run directory, on the engine the config names.

The same ClientApp and ServerApp run on every engine; only the transport changes.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from fedmaml import run_dir as rd
from fedmaml.config.schema import Config
from fedmaml.core.patterns import Pattern
from fedmaml.errors import ConfigError, FedmamlError, PatternError
from fedmaml.federated import checkpoint
from fedmaml.federated.client_app import make_client_app
from fedmaml.federated.health import run_status
from fedmaml.federated.server_app import make_server_app
from fedmaml.federated.setup import check_device, setup_for
from fedmaml.results.recorder import read_summary
from fedmaml.results.run_files import run_dirs_of
from fedmaml.tracking import check_available, one_attempt_per_store


def quiet_frameworks(quiet: bool = False) -> None:
    """Flower and Ray are chatty; fedmaml prints its own progress. ``quiet`` (``--quiet``): MLflow
    and its migrations (alembic) say only warnings too; their INFO lines (``Creating initial MLflow
    database tables``) are otherwise the only output of a quiet run's first use of a store. Both
    the environment (MLflow reads it when imported, here or in a sweep's worker processes) and the
    loggers (if it was imported already)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_LOG_LEVEL", "WARNING")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    if quiet:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        for name in ("mlflow", "alembic"):
            logger = logging.getLogger(name)
            logger.setLevel(max(logger.level, logging.WARNING))


def run_experiment(cfg: Config, quiet: bool = False, run_dir: str | Path | None = None,
                   resume: bool = False, restart: bool = False) -> Path:
    """Run ``cfg`` (and the ``compare_with`` baselines under ``<run_dir>/baselines/``); return the run
    directory (config.yaml, metrics.jsonl, summary.json, model.pt, convergence.png).

    ``run_dir``: where (None: a new directory under ``output_dir``, :func:`run_dir.new_run_dir`);
    the caller owns it, and files of an earlier run in it are replaced (``fedmaml.run`` refuses
    such a directory first: :func:`run_dir.given_run_dir`). The run directory is locked while the
    runs train (fedmaml/run_dir.py): a second process that tries to work in it fails at once,
    naming this one. ``resume``: continue the runs of ``run_dir`` from their checkpoints, each with
    the config of its checkpoint (only the keys of ``run_dir.CHANGEABLE_ON_RESUME`` may differ, and
    the change is recorded); runs that already ended are kept (and must be runs of ``cfg``:
    :func:`run_dir.check_ended`; when every run ended, one line says there is nothing to resume),
    runs not started yet (a baseline after an interrupted run) start, and a run that started but
    has no checkpoint is refused (:func:`run_dir.resumes`). ``restart``: move ``run_dir`` aside (to
    a hidden ``.<name>.old-N`` beside it) and start again there. During a run the first SIGINT or
    SIGTERM stops it after the current round with a checkpoint (fedmaml/federated/checkpoint.py);
    the later runs (baselines) are then not started."""
    quiet_frameworks(quiet)
    if (resume or restart) and run_dir is None:
        raise FedmamlError("resume and restart need the run directory")
    names = list(cfg.compare_with)
    configs = [cfg] + [baseline_config(cfg, n) for n in names]
    for c in configs:  # a config error is reported before anything is moved or locked
        check_config(c)
    if restart and run_dir is not None and rd.has_content(run_dir):
        aside = rd.move_aside(run_dir)
        if not quiet:
            print(f"moved {run_dir} aside to {aside}", file=sys.stderr)
    run_dir = Path(run_dir) if run_dir else rd.new_run_dir(cfg)
    runs = list(zip(configs, run_dirs_of(run_dir, names)))
    # one_attempt_per_store: a tracking store that cannot start is tried for the first run only
    with rd.run_lock(run_dir), checkpoint.stop_on_signals(), one_attempt_per_store():
        todo, changes = [], []
        for i, (c, d) in enumerate(runs):
            summary = read_summary(d)
            if resume and run_status(summary) not in (None, "interrupted"):
                rd.check_ended(d, summary, c, top=run_dir)
                continue  # ended before: its summary says how
            resumes = resume and rd.resumes(d, c, top=run_dir)
            if resumes:  # every run is checked before any change is recorded or run starts
                changes.append(rd.check_resume(d, c, top=run_dir))
            elif resume and rd.has_content(d) and not quiet:  # a baseline: rd.resumes
                print(f"baseline {c.algorithm.name}: no checkpoint to resume from "
                      f"({rd.no_checkpoint_why(c)}); it starts again", file=sys.stderr)
            todo.append((i, c, d, resumes))
        for record in filter(None, changes):
            record()
        if resume and not todo and not quiet:  # said, lest the table read as a resumed run's
            ended = [f"{f'baseline {d.name} ' if i else ''}{run_status(read_summary(d))}"
                     for i, (_, d) in enumerate(runs)]
            print(f"{run_dir}: nothing to resume: the run {'and its baselines ' * (len(runs) > 1)}"
                  f"already ended ({', '.join(ended)})", file=sys.stderr)
        for i, c, d, resumes in todo:
            if i and not quiet:
                print(f"baseline {c.algorithm.name}:", file=sys.stderr)
            run_one(c, d, quiet, resume=resumes)
            if run_status(read_summary(d)) == "interrupted":
                break
    if not quiet:
        print(format_summary([d for _, d in runs]), file=sys.stdout)
    return run_dir


def baseline_config(cfg: Config, algorithm: str) -> Config:
    """``cfg`` with another algorithm (first-order when its estimator does not apply)."""
    from fedmaml.config import replace_paths

    # a baseline is built in: the kwargs of the main run's own algorithm are not its
    updates: dict[str, Any] = {"algorithm.name": algorithm, "algorithm.kwargs": "",
                               "compare_with": (), "name": f"{cfg.name}-{algorithm}"}
    if algorithm in ("per_fedavg", "fedmeta") and cfg.algorithm.meta_gradient not in (
            ("first_order", "hessian_free") if algorithm == "per_fedavg" else ("first_order", "second_order")):
        updates["algorithm.meta_gradient"] = "first_order"
    return replace_paths(cfg, updates)


def check_config(cfg: Config) -> None:
    """Fail fast on bad data/model/pattern settings, on a device the clients cannot have (the same
    on every engine) and on a tracking extra that is not installed, before any engine starts."""
    setup_for(cfg)
    check_device(cfg.engine)
    check_available(cfg.tracking.backends)


def run_one(cfg: Config, run_dir: Path, quiet: bool, resume: bool = False) -> None:
    """One config on the engine it names; the same ClientApp/ServerApp on every engine."""
    check_config(cfg)
    setup = setup_for(cfg)  # cached
    num_nodes = setup.federation.num_clients + setup.federation.num_unseen
    server_app = make_server_app(cfg, run_dir, quiet=quiet, resume=resume)
    client_app = make_client_app(cfg)
    engine = cfg.engine.name
    if engine == "inprocess":
        from fedmaml.engines.inprocess import run_inprocess

        run_inprocess(server_app, client_app, num_nodes)
    elif engine == "ray":
        from fedmaml.engines.ray_engine import run_ray

        if not quiet:  # 5-10 s before the first round's line
            print("starting Ray...", file=sys.stderr, flush=True)
        run_ray(server_app, client_app, num_nodes, cfg.engine)
    elif engine == "vectorized":
        from fedmaml.engines.vectorized import run_vectorized

        run_vectorized(server_app, client_app, num_nodes, cfg).close()
    elif engine == "sharded":
        from fedmaml.engines.sharded import run_sharded

        if not quiet:  # seconds before the first round's line
            print("starting Ray and the shard actors...", file=sys.stderr, flush=True)
        run_sharded(server_app, client_app, num_nodes, cfg, run_dir)
    else:
        raise ConfigError(f"engine.name: {engine!r} is not available in this version; "
                          "use inprocess, ray, vectorized or sharded")


def statuses(run_dir: str | Path, cfg: Config) -> dict[Path, str]:
    """The status of the run of ``cfg`` in ``run_dir`` and of each of its baselines, by directory
    (``summary.json``; ``unfinished`` without one)."""
    return {d: run_status(read_summary(d)) or "unfinished"
            for d in run_dirs_of(run_dir, cfg.compare_with)}


#: The rows of the single-run table: (group, metric prefix, clients, adapted from).
_SUMMARY_ROWS = (("seen", "", "trained", "w (meta-model)"),
                 ("seen", "memory-", "trained", "memory"),
                 ("unseen", "", "unseen", "w (meta-model)"))


def _mean_std(values: dict[str, Any], key: str) -> str:
    """``0.5241 ± 0.41`` (std over clients) from a summary's ``key.mean`` and ``key.std``."""
    mean, std = values.get(f"{key}.mean"), values.get(f"{key}.std")
    if mean is None:
        return "-"
    return f"{mean:.4g}" + (f" ± {std:.2g}" if std is not None else "")


def eval_patterns(run_dir: str | Path, summary: dict[str, Any]) -> tuple[str, str]:
    """The Lambda patterns of a run's first and last evaluation: ``evaluation.pattern``, and after a
    pattern selection that applies to evaluation (``pattern_selection.apply_to``) the chosen one."""
    from fedmaml.config import load_config

    try:
        cfg = load_config(Path(run_dir) / "config.yaml")
    except (OSError, FedmamlError):
        return "?", "?"
    before = after = str(cfg.evaluation.pattern)
    chosen = (summary.get("pattern_selection") or {}).get("chosen")
    if chosen and "evaluation" in cfg.pattern_selection.apply_to:
        after = str(chosen)
    return before, after


def _eval_steps(summary: dict[str, Any], before: str, after: str) -> list[int | str]:
    """The adaptation steps of a run's evaluations: ``eval_steps`` of its summary (what its
    ``evaluation.pattern`` runs), and a selected pattern's own (canonical, written out)."""
    steps: list[int | str] = [summary.get("eval_steps", "?")]
    if after != before:
        try:
            steps.append(Pattern.parse(after).steps)
        except PatternError:
            steps.append("?")
    return steps


def _steps_text(steps: set[int | str], word: str = "adaptation step") -> str:
    """``1 adaptation step``, ``5 adaptation steps``; runs or columns that differ: ``1 or 5
    adaptation steps (each column's pattern has its own)``."""
    counts = sorted(steps, key=lambda n: (isinstance(n, str), str(n) if isinstance(n, str) else n))
    if counts == [1]:
        return f"1 {word}"
    return (" or ".join(map(str, counts)) + f" {word}s"
            + (" (each column's pattern has its own)" if len(counts) > 1 else ""))


def format_summary(run_dirs: list[str | Path]) -> str:
    """The table ``fedmaml run`` prints: per algorithm, the personalized metric of trained and unseen
    clients adapted from the meta-model and (trained clients) from their memory, before and after
    training, as mean ± std over clients, with the evaluation pattern of each column, a one-line
    legend per column, and the status of every run that did not complete."""
    summaries = [(Path(d), read_summary(d)) for d in run_dirs]
    done = [(d, s) for d, s in summaries if s is not None]
    if not done:
        return "no finished run to summarize"
    key = done[0][1]["metric"]
    patterns = {d: eval_patterns(d, s) for d, s in done}
    counts = {n for d, s in done for n in _eval_steps(s, *patterns[d])}
    steps = _steps_text(counts)
    # The first column, down an algorithm's rows: its name, its time, its status if it failed; as
    # wide as the longest (a user's algorithm is named by its import path).
    sides = {d: [s["algorithm"], f"({s['seconds']:.0f}s)",
                 *([] if run_status(s) == "completed" else [run_status(s).upper()])]
             for d, s in done}
    width = max(12, 2 + max(len(x) for side in sides.values() for x in side))
    head = (f"{'algorithm':<{width}}{'clients':<9}{'adapted from':<16}{'before training':>17}"
            f"{'after training':>17}  pattern")
    lines = [f"personalized {key} after {steps}, mean ± std over clients; run "
             f"directory {run_dirs[0]}", head, "-" * len(head)]
    notes, keeps_memory = [], []
    for d, s in done:
        status = run_status(s)
        before_p, after_p = patterns[d]
        side = sides[d]
        pattern = before_p if before_p == after_p else f"{before_p} -> {after_p}"
        rows = [(clients, source, f"{group}.{prefix}{key}")
                for group, prefix, clients, source in _SUMMARY_ROWS
                if f"{group}.{prefix}{key}.mean" in {**s["before"], **s["after"]}]
        if any(source == "memory" for _, source, _ in rows):
            keeps_memory.append(s["algorithm"])
        for i in range(max(len(rows), len(side))):
            first = side[i] if i < len(side) else ""
            if i >= len(rows):
                lines.append(first)
                continue
            clients, source, metric = rows[i]  # no memory row for FedAvg, no unseen row without them
            lines.append(f"{first:<{width}}{clients:<9}{source:<16}"
                         f"{_mean_std(s['before'], metric):>17}"
                         f"{_mean_std(s['after'], metric):>17}  {pattern}")
        if status != "completed":
            notes.append(f"{s['algorithm']} did not complete: {s.get('message', status)}")
        lost = {k: n for k, n in {**s.get("failures", {}),
                                  "rejected": s.get("rejected_updates", 0)}.items() if n}
        if status == "completed" and lost:  # it completed, but not every client took part
            notes.append(f"{s['algorithm']} completed with {sum(lost.values())} replies not used ("
                         + ", ".join(f"{k} {n}" for k, n in lost.items()) + f"; {s['replies']} "
                         "used)")
        if status == "completed" and s.get("memory_resets"):  # fresh memories replaced corrupt ones
            notes.append(f"{s['algorithm']} completed, {s['memory_resets']} client memories reset "
                         f"(clients {', '.join(map(str, s.get('memory_reset_clients', [])))}: their "
                         "memory files were corrupt and were moved aside; memory-reset=true)")
    switched = any(b != a for b, a in patterns.values())
    legend = [
        "columns:",
        "  clients       trained: take part in training; unseen: never train (both are measured on "
        "held-out points)",
        f"  adapted from  w: the meta-model, adapted with {_steps_text(counts, 'step')} on the "
        "client's own points before it is measured"
        + (f"; memory: the memory each client keeps ({', '.join(dict.fromkeys(keeps_memory))}), "
           "adapted the same way" if keeps_memory else ""),
        "  before/after  the first evaluation (round 0: the initial model, no memories yet) / the "
        "last one",
        "  pattern       the Lambda pattern of that adaptation (full: every layer group)"
        + ("; 'a -> b': b was selected during training (pattern_selection): before used a, "
           "after b" if switched else "; the same before and after"),
    ]
    return "\n".join(lines + notes + legend)
