"""Reference experiment 1: the MOML sinewave protocol, one command
(docs/algorithms.md#reference-protocol-moml-sinewave).

Six methods on the 25-task sinewave grid, centralized (the federated engine with H = 1, one task per
client, B = 3 tasks per step, in-process), at K = 1 and K = 3:

* FO-MAML        ``fedmeta`` + ``first_order``
* MOML           ``moml`` (meta-gradient scaled by beta, the public code's eta convention)
* LocalMOML      ``moml`` with H = 5 local steps and ``steps / 5`` rounds (equal sample budget)
* MOML-V2        ``moml`` + ``memory_policy: decay_to_w``: one silo holding all 25 grid tasks,
                 ``tasks_per_step = 3`` (decay_to_w needs every task's memory at every step)
* Per-FedAvg-HF  ``per_fedavg`` + ``hessian_free``
* Reptile        ``reptile``

Two phases, both resumable (a run whose ``summary.json`` exists is not run again):

1. ``tune``: per method and K, ``fedmaml tune`` (fedmaml/tune, docs/tuning.md) picks ``eta`` (and
   ``beta`` for memory methods) over the protocol's grid, every candidate on ``--tune-seeds``
   (default 100 and 101), on validation tasks (test-distribution tasks 5..24, disjoint from the
   reported test tasks 0..4; MOML-V2: its unseen silo 1, tasks 25..49), with its robust choice:
   a candidate that diverges on a seed or whose validation curve rises late is not chosen.
   ``--rungs N`` adds successive halving.
2. ``final``: the chosen values, ``--seeds`` seeds, ``--steps`` steps; the test MSE on tasks 0..4
   after 10 SGD steps of 0.01 on 10 points, and the wall time per step.

Every model is measured by the same post-hoc evaluation (:func:`heldout_mse`) so that MOML-V2,
whose single silo holds all tasks, is scored on exactly the same test tasks as the others.

    python simulations/reproduce_moml_sinewave.py                   # reduced (see docs/results.md)
    python simulations/reproduce_moml_sinewave.py --quick           # smoke test, a minute
    python simulations/reproduce_moml_sinewave.py --full-protocol   # 40,000 steps, full grid, 5 seeds
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedmaml.provenance import with_provenance

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "sinewave_centralized.yaml"
ETA_GRID = (0.1, 0.05, 0.01, 0.005, 0.001)
BETA_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)
TEST_TASKS = range(0, 5)  # the paper's test tasks (sample_amp_pha seeds 0-4)
VALIDATION_TASKS = range(5, 25)  # same distribution, used only for tuning
LOCAL_STEPS = 5  # LocalMOML's H in the public code


@dataclass(frozen=True)
class Method:
    name: str
    overrides: tuple[str, ...]
    uses_beta: bool
    # The public code's chosen values {K: (eta, beta)}
    # (docs/algorithms.md#reference-protocol-moml-sinewave).
    public: dict[int, tuple[float, float]]


METHODS = (
    Method("FO-MAML", ("algorithm.name=fedmeta", "algorithm.meta_gradient=first_order",
                       "algorithm.scale_by_beta=false"), False, {1: (0.001, 1.0), 3: (0.005, 1.0)}),
    Method("MOML", ("algorithm.name=moml", "algorithm.scale_by_beta=true"), True,
           {1: (0.005, 0.3), 3: (0.01, 0.5)}),
    Method("LocalMOML", ("algorithm.name=moml", "algorithm.scale_by_beta=true",
                         f"algorithm.local_steps={LOCAL_STEPS}"), True,
           {1: (0.005, 0.3), 3: (0.01, 0.5)}),
    # One silo holding all 25 grid tasks, B = 3 of them per step; the unseen "client" holds
    # test-distribution tasks 0..24, of which heldout_mse picks the ones it needs.
    Method("MOML-V2", ("algorithm.name=moml", "algorithm.scale_by_beta=true",
                       "algorithm.memory_policy=decay_to_w", "federated.mode=cross_silo",
                       "federated.clients_per_round=0", "data.num_clients=1", "data.tasks_per_client=25",
                       "data.unseen_clients=1",
                       "algorithm.tasks_per_step=3"), True, {1: (0.005, 0.1), 3: (0.01, 0.1)}),
    Method("Per-FedAvg-HF", ("algorithm.name=per_fedavg", "algorithm.meta_gradient=hessian_free",
                             "algorithm.scale_by_beta=false"), False,
           {1: (0.001, 1.0), 3: (0.005, 1.0)}),  # not in the public code: FO-MAML's values
    Method("Reptile", ("algorithm.name=reptile", "algorithm.scale_by_beta=false"), False,
           {1: (0.05, 1.0), 3: (0.1, 1.0)}),
)
#: Variants run on request (``--methods``), not by default: Per-FedAvg-HF with the finite-difference
#: step taken along v / ||v|| (simulations/hf_divergence.py), at two probe lengths, and the exact
#: second-order MAML meta-gradient that the Hessian-free estimator approximates.
EXTRA_METHODS = tuple(
    Method(f"Per-FedAvg-HF-normalized{suffix}",
           ("algorithm.name=per_fedavg", "algorithm.meta_gradient=hessian_free",
            "algorithm.hf_perturbation=normalized", f"algorithm.hf_delta={delta}",
            "algorithm.scale_by_beta=false"), False, {1: (0.001, 1.0), 3: (0.005, 1.0)})
    for suffix, delta in (("", 0.001), ("-d0.01", 0.01))) + (
    Method("MAML-SO", ("algorithm.name=fedmeta", "algorithm.meta_gradient=second_order",
                       "algorithm.scale_by_beta=false"), False, {1: (0.001, 1.0), 3: (0.005, 1.0)}),
)
BY_NAME = {m.name: m for m in METHODS + EXTRA_METHODS}


def k_overrides(k: int) -> list[str]:
    """K support and K query points per task; the memory initialisation uses K0 = 2K."""
    return [f"algorithm.support_size={k}", f"algorithm.query_size={k}",
            f"algorithm.init_support_size={2 * k}"]


#: The evaluation protocols (docs/results.md): fedmaml's default, and the MOML public code's.
PROTOCOLS = ("fedmaml", "public")


def protocol_overrides(protocol: str, method: Method, k: int) -> list[str]:
    """The public code's protocol: every seed starts from one model (seed 1234); the test tasks
    adapt on the first 10 of 100 shared points (seed 2021) and are measured on all 100; MOML's
    memories are made from the initial model with K points; LocalMOML rebuilds its memory at every
    participation with K0 = 2K points. (It also samples LocalMOML's tasks with replacement, which
    fedmaml's client sampling does not offer.)"""
    if protocol == "fedmaml":
        return []
    common = ["data.eval_points=shared", "model.init_seed=1234"]
    if method.name == "LocalMOML":
        return [*common, "algorithm.memory_policy=reinit"]
    if method.uses_beta:
        return [*common, "algorithm.memory_init=initial_model", f"algorithm.init_support_size={k}"]
    return common


def rounds_for(method: Method, steps: int, k: int = 1, protocol: str = "fedmaml") -> int:
    # LocalMOML does H meta-steps per round: steps / H rounds see the same number of samples.
    if method.name != "LocalMOML":
        return steps
    if protocol == "public":
        # It also rebuilds its memory from K0 = 2K points at every participation; the public code
        # pays for them with fewer rounds: steps / ratio iterations, ratio = (K0 + K H) / (K H).
        ratio = (2 * k + k * LOCAL_STEPS) / (k * LOCAL_STEPS)
        return max(1, int(steps // ratio) // LOCAL_STEPS)
    return max(1, steps // LOCAL_STEPS)


def run_name(method: Method, k: int, eta: float, beta: float, seed: int, steps: int,
             protocol: str = "fedmaml") -> str:
    b = f"-b{beta:g}" if method.uses_beta else ""
    p = "" if protocol == "fedmaml" else f"-{protocol}"
    return f"{method.name}-K{k}-e{eta:g}{b}-s{seed}-n{steps}{p}"


def make_config(method: Method, k: int, eta: float, beta: float, seed: int, steps: int,
                out: Path, curve_points: int, protocol: str = "fedmaml") -> Any:
    from fedmaml.config import load_config

    rounds = rounds_for(method, steps, k, protocol)
    every = max(1, rounds // curve_points) if curve_points else 0
    beta_key = [f"algorithm.beta={beta}"] if method.uses_beta else []
    # long runs checkpoint, so that a stopped protocol resumes where it was
    keep = [f"federated.checkpoint_every={max(1, rounds // 8)}"] if steps >= 10000 else []
    return load_config(CONFIG, [*method.overrides, *k_overrides(k),
                                *protocol_overrides(protocol, method, k), f"algorithm.eta={eta}",
                                *beta_key, f"seed={seed}", f"federated.rounds={rounds}",
                                f"federated.eval_every={every}", f"output_dir={out}", *keep,
                                f"name={run_name(method, k, eta, beta, seed, steps, protocol)}"])


def heldout_mse(run_dir: Path, cfg: Any, tasks: range) -> list[float]:
    """MSE of the run's final ``w`` on test-distribution tasks ``tasks`` after the protocol's
    adaptation (10 SGD steps of ``evaluation.alpha`` on 10 points, measured on 100 others)."""
    from fedmaml.core.evaluation import personalized_metrics
    from fedmaml.data import build_federation
    from fedmaml.federated.setup import setup_for

    setup = setup_for(cfg)
    w = torch.load(run_dir / "model.pt")
    # The unseen "client" 0 of a 25-tasks-per-client grid holds test tasks q = 0..24 in order.
    pool = build_federation({"family": "sinusoid_grid", "num_clients": 1, "unseen_clients": 1,
                             "tasks_per_client": 25,
                             "eval_adapt_size": cfg.data.eval_adapt_size,
                             "eval_heldout_size": cfg.data.eval_heldout_size,
                             "eval_points": cfg.data.eval_points}, 0).unseen_tasks(0)
    return [float(personalized_metrics(setup.model, setup.loss_fn, w, *pool[q].evaluation_split(),
                                       setup.eval_pattern, setup.eval_alpha, False)["loss"])
            for q in tasks]


def step_ms(metrics: list[dict[str, Any]], method: Method) -> float:
    """Median wall time of a training round (evaluation rounds excluded) per meta-step."""
    # ``seconds`` is the run's running clock, so a round's time is a difference of neighbours.
    rows = [r for r in metrics if "seconds" in r and "clients" in r]
    gaps = [b["seconds"] - a["seconds"] for a, b in zip(rows, rows[1:])
            if b["round"] == a["round"] + 1 and "eval" not in b]
    per_round = statistics.median(gaps) * 1000 if gaps else float("nan")
    return per_round / (LOCAL_STEPS if method.name == "LocalMOML" else 1)


def run_one(job: tuple) -> dict[str, Any]:
    """Run (or reuse) one training run and score it; executed in a worker process. ``job`` is
    ``(method, K, eta, beta, seed, steps, output dir, curve points[, protocol])``."""
    torch.set_num_threads(1)
    name, k, eta, beta, seed, steps, out, curve_points, *rest = job
    protocol = rest[0] if rest else "fedmaml"
    from fedmaml.experiment import run_experiment
    from fedmaml.federated.health import run_status
    from fedmaml.results.recorder import read_metrics, read_summary

    method = BY_NAME[name]
    cfg = make_config(method, k, eta, beta, seed, steps, Path(out), curve_points, protocol)
    run_dir = Path(out) / cfg.name
    if read_summary(run_dir) is None:
        run_experiment(cfg, quiet=True, run_dir=run_dir)
    metrics = read_metrics(run_dir)
    test = heldout_mse(run_dir, cfg, TEST_TASKS)
    val = heldout_mse(run_dir, cfg, VALIDATION_TASKS)
    # test MSE of the unseen clients against the training examples drawn so far
    curve = [(r["samples"], r["eval"]["unseen.loss.mean"])
             for r in metrics if "eval" in r and "unseen.loss.mean" in r["eval"]]
    return {"method": name, "K": k, "eta": eta, "beta": beta, "seed": seed, "steps": steps,
            "protocol": protocol, "status": run_status(read_summary(run_dir)),
            "rounds_completed": read_summary(run_dir).get("rounds_completed"),
            "run_dir": str(run_dir), "test_mse": statistics.mean(test), "val_mse": statistics.mean(val),
            # a vectorized batch's round trains all its runs: one run's share
            "ms_per_step": step_ms(metrics, method) / read_summary(run_dir).get("batch", {}).get(
                "runs", 1),
            "samples": max(r.get("samples", 0) for r in metrics), "curve": curve}


def train_part(jobs: list[tuple]) -> float:
    """Train jobs of one method, K, protocol and budget (they differ in eta, beta and seed) as one
    vectorized batch (``fedmaml sweep --vectorize``'s engine); runs that finished are skipped,
    runs checkpointed after one round continue from there. Returns the wall time."""
    import time

    from fedmaml.results.recorder import read_summary
    from fedmaml.sweep import execute_batch

    torch.set_num_threads(1)
    configs, dirs = [], []
    for name, k, eta, beta, seed, steps, out, curve_points, protocol in jobs:
        cfg = make_config(BY_NAME[name], k, eta, beta, seed, steps, Path(out), curve_points,
                          protocol)
        if read_summary(Path(out) / cfg.name) is None:
            configs.append(cfg)
            dirs.append(Path(out) / cfg.name)
    if not configs:
        return 0.0
    start = time.perf_counter()
    label = f"{jobs[0][0]} K={jobs[0][1]} {jobs[0][8]} ({len(configs)} runs, {jobs[0][5]} steps)"
    print(f"batch {label}: started", flush=True)
    errors = {e for _, e in execute_batch(configs, dirs, quiet=True) if e}
    seconds = time.perf_counter() - start
    print(f"batch {label}: {seconds:.0f} s" + (f"; FAILED: {errors}" if errors else ""),
          flush=True)
    return seconds


def train_batched(jobs: list[tuple], workers: int) -> None:
    """All jobs' training as vectorized batches, one per method, K, protocol and budget, run by
    ``workers`` parallel processes."""
    groups: dict[tuple, list[tuple]] = {}
    for job in jobs:
        name, k, _, _, _, steps, out, curve_points, *rest = job
        full = (*job[:8], rest[0] if rest else "fedmaml")
        groups.setdefault((name, k, steps, out, curve_points, full[8]), []).append(full)
    # A group is split only when there are fewer groups than workers: a bigger batch costs less
    # per run.
    split = max(1, -(-workers // len(groups))) if groups else 1
    parts = []
    for members in groups.values():
        n = min(split, len(members))
        parts += [members[i::n] for i in range(n)]
    parts.sort(key=len, reverse=True)  # the largest first: the pool ends evenly
    from fedmaml.sweep import worker_pool  # workers end with this process, without tracebacks

    with worker_pool(workers, max_tasks_per_child=1) as pool:
        for _ in pool.map(train_part, parts):
            pass


def run_all(jobs: list[tuple], workers: int, vectorize: bool = True) -> list[dict[str, Any]]:
    """Train (vectorized batches, or run by run) and score every job."""
    if vectorize:
        train_batched(jobs, workers)
    from fedmaml.sweep import worker_pool  # workers end with this process, without tracebacks

    results = []
    with worker_pool(workers, max_tasks_per_child=20) as pool:
        for i, r in enumerate(pool.map(run_one, jobs)):
            results.append(r)
            print(f"[{i + 1}/{len(jobs)}] {r['method']:13s} K={r['K']} eta={r['eta']:g} "
                  f"beta={r['beta']:g} seed={r['seed']}: val {r['val_mse']:.3f} test "
                  f"{r['test_mse']:.3f} ({r['ms_per_step']:.1f} ms/step)", flush=True)
    return results


def usable(result: dict[str, Any]) -> bool:
    """A run that completed with a finite score. A diverged run stops and keeps its last good
    model, whose score may be finite: its status says it diverged."""
    return result.get("status", "completed") == "completed" and math.isfinite(result["test_mse"])


#: Evaluations of a tuning run (its validation curve, which the late-rise rule reads).
TUNE_CURVE_POINTS = 16


def validation(method: Method) -> tuple[list[str], str]:
    """The overrides that make the tuning runs evaluate validation tasks too, and the metric over
    them. The unseen clients' ids follow the training clients' (``num_clients + q``): with one task
    per client, unseen clients 5..24 (ids 30..49) hold test-distribution tasks 5..24; MOML-V2's
    single silo of 25 tasks has unseen silo 1 (id 2) with tasks 25..49. Never the test tasks 0..4."""
    if method.name == "MOML-V2":
        return ["data.unseen_clients=2"], "unseen.loss@2"
    first = 25 + VALIDATION_TASKS.start
    return [f"data.unseen_clients={25}"], f"unseen.loss@{first}-{first + len(VALIDATION_TASKS) - 1}"


def tune_one(job: tuple) -> dict[str, Any]:
    """One method and K: ``fedmaml tune`` over the protocol's grid in ``out/<method>-K<k>``;
    executed in a worker process. Returns the choice and every candidate."""
    torch.set_num_threads(1)
    name, k, steps, seeds, out, protocol, rungs = job
    from fedmaml.config import parse_override, replace_paths
    from fedmaml.tune.metric import parse_metric
    from fedmaml.tune.space import parse_space
    from fedmaml.tune.tuner import Tuner, TuneSpec

    method = BY_NAME[name]
    eta, beta = method.public[k]
    base = make_config(method, k, eta, beta, seeds[0], steps, Path(out), TUNE_CURVE_POINTS,
                       protocol)
    extra, metric = validation(method)
    base = replace_paths(base, dict(parse_override(o) for o in extra))
    space = [f"algorithm.eta={','.join(map(str, ETA_GRID))}"]
    if method.uses_beta:
        space.append(f"algorithm.beta={','.join(map(str, BETA_GRID))}")
    spec = TuneSpec(space=parse_space(space), seeds=tuple(seeds), metric=parse_metric(metric),
                    rungs=rungs)
    result = Tuner(base, spec, Path(out) / f"{name}-K{k}", quiet=True).run()
    (s,) = result.settings
    pick = s.choice.longest
    assert pick is not None
    chosen = (pick.params["algorithm.eta"], pick.params.get("algorithm.beta", beta))
    print(f"tuned {name} K={k}: {s.choice.describe()}", flush=True)
    return {"method": name, "K": k, "chosen": chosen, "eligible": s.choice.chosen is not None,
            "margin": s.choice.margin, "edges": s.choice.edges, "report": str(result.report),
            "seconds": result.seconds,
            "candidates": [{"eta": c.params["algorithm.eta"],
                            "beta": c.params.get("algorithm.beta", beta), "val_mse": c.score,
                            "std": c.spread, "excluded": c.excluded,
                            "rounds": max((r.rounds for r in c.runs), default=0)}
                           for c in s.choice.ranked]}


def tune(methods: list[Method], ks: list[int], steps: int, seeds: list[int], out: Path,
         workers: int, protocol: str = "fedmaml", rungs: int = 1
         ) -> tuple[dict[tuple[str, int], tuple[float, float]], list[dict[str, Any]]]:
    """Every method and K tuned by ``fedmaml tune`` (``workers`` of them at a time, each one's
    candidates x seeds trained as vectorized batches). When no candidate is eligible (every one
    diverged, as Per-FedAvg-HF's often do) the one that trained longest is used, and the tuning
    record says so (``eligible: false``)."""
    jobs = [(m.name, k, steps, seeds, str(out), protocol, rungs) for m in methods for k in ks]
    from fedmaml.sweep import worker_pool  # workers end with this process, without tracebacks

    with worker_pool(workers, max_tasks_per_child=1) as pool:
        tuned = list(pool.map(tune_one, jobs))
    chosen = {(t["method"], t["K"]): tuple(t["chosen"]) for t in tuned}
    return chosen, sorted(tuned, key=lambda t: (t["K"], t["method"]))


def summarize(final: list[dict[str, Any]], chosen: dict, methods: list[Method], ks: list[int]
              ) -> list[dict[str, Any]]:
    rows = []
    for k, m in itertools.product(ks, methods):
        mine = [r for r in final if r["method"] == m.name and r["K"] == k]
        # Diverged seeds are counted and left out of the mean, never hidden.
        mse = [r["test_mse"] for r in mine if usable(r)]
        ms = [r["ms_per_step"] for r in mine]
        eta, beta = chosen[(m.name, k)]
        rows.append({"K": k, "method": m.name, "eta": eta, "beta": beta if m.uses_beta else None,
                     "seeds": len(mine), "diverged": len(mine) - len(mse),
                     "mse_mean": statistics.mean(mse) if mse else math.nan,
                     "mse_std": statistics.stdev(mse) if len(mse) > 1 else 0.0,
                     "ms_per_step": statistics.median(ms),
                     "samples": statistics.mean(r["samples"] for r in mine)})
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| K | method | eta | beta | test MSE (mean ± std) | diverged seeds | ms / step (one "
             "run's share) | samples / run |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        beta = "-" if r["beta"] is None else f"{r['beta']:g}"
        lines.append(f"| {r['K']} | {r['method']} | {r['eta']:g} | {beta} | "
                     f"{r['mse_mean']:.3f} ± {r['mse_std']:.3f} | {r['diverged']}/{r['seeds']} | "
                     f"{r['ms_per_step']:.1f} | "
                     f"{r['samples']:.0f} |")
    return "\n".join(lines)


def tuning_table(tuned: list[dict[str, Any]]) -> str:
    """Every tuning candidate: its validation MSE (mean and std over the tuning seeds) and why it
    was not chosen."""
    lines = ["| K | method | eta | beta | validation MSE (mean ± std) | status |",
             "|---|---|---|---|---|---|"]
    for t in tuned:
        uses_beta = BY_NAME[t["method"]].uses_beta
        for c in sorted(t["candidates"], key=lambda c: (c["eta"], c["beta"])):
            beta = f"{c['beta']:g}" if uses_beta else "-"
            mse = (f"{c['val_mse']:.3f} ± {c['std']:.3f}" if c["excluded"] is None
                   else "-")
            chosen = (c["eta"], c["beta"]) == tuple(t["chosen"])
            status = ("**chosen**" if chosen and t["eligible"] else
                      "used: none eligible, trained longest" if chosen else
                      c["excluded"] or "eligible")
            lines.append(f"| {t['K']} | {t['method']} | {c['eta']:g} | {beta} | {mse} | "
                         f"{status} |")
    return "\n".join(lines)


def plot(final: list[dict[str, Any]], methods: list[Method], ks: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(ks), figsize=(6 * len(ks), 4), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for m in methods:
            if m.name == "MOML-V2":
                continue  # its run-time unseen metric averages 25 test tasks, not the 5 reported
            curves = [r["curve"] for r in final if r["method"] == m.name and r["K"] == k
                      and usable(r)]
            if not curves or not curves[0]:
                continue
            n = min(len(c) for c in curves)
            x = [p[0] for p in curves[0][:n]]
            y = np.array([[p[1] for p in c[:n]] for c in curves])
            ax.plot(x, y.mean(0), label=m.name)
            ax.fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.15)
        ax.set_title(f"sinewave grid, K = {k} (mean ± std over seeds)")
        ax.set_xlabel("training examples drawn")
        ax.set_ylabel("test MSE, 5 unseen tasks, 10 adaptation steps")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def run_protocol(a: argparse.Namespace, methods: list[Method], protocol: str, out: Path,
                 figure: str | None, public_values: bool, runs: Path) -> dict[str, Any]:
    """Tuning (unless ``public_values``), then the finals on ``a.seeds``, for one protocol;
    writes table.md, tuning.md, results.json under ``out`` and the figure. The runs go under
    ``runs`` (tune/, final/), so a final that tuning and the public values share runs once."""
    import time

    start = time.perf_counter()
    tuning: list[dict[str, Any]] = []
    if public_values:
        chosen = {(m.name, k): m.public[k] for m in methods for k in a.ks}
    else:
        chosen, tuning = tune(methods, a.ks, a.tune_steps, a.tune_seeds, runs / "tune",
                              a.workers, protocol, a.rungs)
    print("chosen (eta, beta):", {f"{n} K={k}": v for (n, k), v in chosen.items()}, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    if tuning:  # written at once: the finals take as long again
        (out / "tuning.md").write_text(tuning_table(tuning) + "\n")
        (out / "tuning.json").write_text(json.dumps(with_provenance(
            {"chosen": {f"{n} K={k}": v for (n, k), v in chosen.items()}, "tuning": tuning,
             "wall_seconds": time.perf_counter() - start}), indent=1))
    jobs = [(m.name, k, *chosen[(m.name, k)], s, a.steps, str(runs / "final"), a.curve_points,
             protocol)
            for k in a.ks for m in methods for s in a.seeds]
    final = run_all(jobs, a.workers, a.engine == "batch")
    rows = summarize(final, chosen, methods, a.ks)
    table = markdown_table(rows)
    what = "the public code's step sizes" if public_values else "step sizes tuned on validation tasks"
    print(f"\n[{protocol} protocol, {what}] final test MSE after {a.steps} meta-steps, seeds "
          f"{a.seeds}:\n{table}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    seconds = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(with_provenance(
        {"args": vars(a), "protocol": protocol, "public_values": public_values, "rows": rows,
         "final": final, "tuning": tuning, "wall_seconds": seconds}), indent=1))
    if figure:
        plot(final, methods, a.ks, Path(figure))
        print(f"figure: {figure}")
    print(f"[{protocol} protocol, {what}] wall time {seconds / 60:.1f} min", flush=True)
    return {"rows": rows, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000, help="meta-steps of the final runs")
    p.add_argument("--tune-steps", type=int, default=800, help="meta-steps of each tuning run")
    p.add_argument("--tune-seeds", type=int, nargs="+", default=[100, 101],
                   help="seeds every tuning candidate runs on (at least 2)")
    p.add_argument("--rungs", type=int, default=1,
                   help="successive halving in tuning: rungs (1 = off; fedmaml tune --rungs)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 3])
    p.add_argument("--methods", nargs="+", default=[m.name for m in METHODS],
                   choices=list(BY_NAME))
    p.add_argument("--public-values", action="store_true",
                   help="skip tuning; use the public code's eta/beta "
                        "(docs/algorithms.md#reference-protocol-moml-sinewave)")
    p.add_argument("--also-public-values", action="store_true",
                   help="after the tuned finals, the finals with the public code's eta/beta too "
                        "(under <output-dir>/public-values)")
    p.add_argument("--protocol", choices=(*PROTOCOLS, "both"), default="fedmaml",
                   help="evaluation protocol: fedmaml's default or the MOML public code's "
                        "(shared evaluation points, one initial model, memories made at the start); "
                        "both: one after the other, each under <output-dir>/<protocol>")
    p.add_argument("--engine", choices=("batch", "runs"), default="batch",
                   help="the finals: batch: the runs of a method, K and protocol train as "
                        "vectorized batches (fedmaml sweep --vectorize's engine); runs: one run "
                        "per process (tuning always trains vectorized batches: fedmaml tune)")
    p.add_argument("--curve-points", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--output-dir", help="default: results/moml_sinewave (--full-protocol: "
                                        "results/moml_sinewave_full)")
    p.add_argument("--figure", help="default: docs/figures/sinewave_convergence.png "
                                    "(--full-protocol: docs/figures/sinewave_full.png, one per "
                                    "protocol and step-size choice)")
    p.add_argument("--quick", action="store_true", help="smoke test: 200 steps, 2 seeds, K = 1")
    p.add_argument("--full-protocol", action="store_true",
                   help="the paper's protocol: 40,000 steps, the grid tuned at 40,000 steps, "
                        "5 seeds, both evaluation protocols, also the public code's step sizes")
    a = p.parse_args()
    if a.quick:
        a.steps, a.tune_steps, a.seeds, a.ks = 200, 100, [0, 1], [1]
    if a.full_protocol:
        a.steps, a.tune_steps, a.seeds = 40000, 40000, [0, 1, 2, 3, 4]
        a.protocol, a.also_public_values = "both", True
    full = "_full" if a.full_protocol else ""
    a.output_dir = a.output_dir or f"results/moml_sinewave{full}"
    a.figure = a.figure or ("docs/figures/sinewave_full.png" if a.full_protocol
                            else "docs/figures/sinewave_convergence.png")
    methods = [BY_NAME[n] for n in a.methods]
    protocols = PROTOCOLS if a.protocol == "both" else (a.protocol,)
    out = Path(a.output_dir)
    timings = {}
    for protocol in protocols:
        where = out / protocol if a.protocol == "both" else out
        figure = a.figure
        if figure and a.protocol == "both":
            figure = str(Path(figure).with_name(f"{Path(figure).stem}_{protocol}.png"))
        variants = [a.public_values] + ([True] if a.also_public_values and not a.public_values
                                        else [])
        for public in variants:
            sub = where / "public-values" if public and not a.public_values else where
            fig = figure
            if fig and public and not a.public_values:
                fig = str(Path(fig).with_name(f"{Path(fig).stem}_public-values.png"))
            timings[f"{protocol}{'/public-values' if public else ''}"] = run_protocol(
                a, methods, protocol, sub, fig, public, where)["seconds"]
    total = sum(timings.values())
    print("wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
          + f"; total {total / 60:.1f} min", flush=True)


if __name__ == "__main__":
    from fedmaml.cli import run_command  # Ctrl-C: "interrupted", exit 130, no traceback

    raise SystemExit(run_command(main))
