"""The same client work timed four ways: a bare PyTorch loop, the in-process, Ray and vectorized
engines (docs/performance.md).

* **bare**: no Flower at all. Per round: the same seeded client sample as the strategy, and per client
  the same ``draw_round`` (the client's own counter-based stream) and the same core ``client_update`` as the
  ClientApp, memories in a dict, then the same aggregation and server optimizer. It is the floor a
  per-client engine can reach, so ``inprocess / bare`` isolates framework overhead.
* **inprocess**, **ray**, **vectorized**: ``run_experiment`` on that engine. A round's time is read
  from the run's metrics.jsonl (``seconds`` is stamped after each round inside the ServerApp), so
  engine start-up (Ray's several seconds) is excluded; the first round (warm-up: actors build their
  data) and the last (it also evaluates) are left out, and the median of the remaining rounds is
  reported.

Cases (all MOML, first order, 1 torch thread, ``evaluation.steps=1`` on one client at rounds 0 and
R only):

* **a**: sinewave, MLP 1-40-40-1, K=5, 3 of 100 clients per round, H=1;
* **b**: digits (8x8), MLP 64-64-64-10, 10 support + 10 query, 100 of 100 clients per round;
* **c**: digits, Conv-4 (width 64), 10 + 10 examples, H=5 local steps, 4 of 100 clients per round;
  Ray with 1 actor (``engine.num_cpus=2`` on 2 CPUs) and with 2 actors (``num_cpus=1``), 60 rounds
  each: Ray rounds last whole multiples of Flower's 0.1 s dispatch cycle, and whether two actors'
  share of a round fits into one cycle depends on how many of its clients first initialise their
  memory (an extra adaptation), which is most of them in the first rounds and few later on; every
  round's time is kept (``ray_round_ms``);
* **d**: 1,000 clients per round, MLP 40-64-64-10 on MNIST-1D (10,000 examples; scikit-learn's digits
  has 1,797 images, too few for 1,000 clients with 2 examples each), 10 + 10 examples.

Cases b and d are also run with the vectorized engine on 2 torch threads
(``vectorized_2threads_ms_per_round``; every other number uses 1 thread), with ``--compile`` with
``engine.compile=true`` (``vectorized_compiled_ms_per_round``), and report
``compute_only``: one round's client updates alone, as a loop of ``client_update`` and as one
``cohort_update`` (the data drawn beforehand; no messages, no server), i.e. the ceiling of the
vectorized speedup before the per-client costs both paths pay, and the time of the cohort's batched
data draw (``cohort_draw_ms``).

Cases a and b also time ``flower_floor_ms_per_round``: the bare loop with each client's work wrapped
in the Flower objects that every per-client engine on Flower's Message API creates (messages,
records, a ClientApp call, Context.state) and nothing else of ours, a floor for ``inprocess /
bare``.

Repeats run the methods back to back (bare, inprocess, vectorized, then Ray) so load changes on a
shared machine hit all of them alike; medians over repeats are reported, with every repeat's value,
the load average before and after each case, and the thread count. Run:

    PYTHONPATH=. .venv/bin/python simulations/benchmarks/engines.py --out engines.json

Output: ``{"a": {"bare_ms_per_round", "inprocess_ms_per_round", "ray_ms_per_round",
"vectorized_ms_per_round", "ratios", "repeats", "load"}, "b": {...}, "c": {...,
"ray_1actor_ms_per_round", "ray_2actor_ms_per_round"}, "d": {...}, "machine": {...},
"targets": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from fedmaml import collector
from fedmaml.algorithms import client_update, draw_cohort, draw_round
from fedmaml.config import load_config
from fedmaml.core.server import ServerOptimizer, aggregate
from fedmaml.data.counter import round_keys
from fedmaml.engines.allocator import retain_freed_memory
from fedmaml.experiment import run_experiment
from fedmaml.federated.setup import setup_for
from fedmaml.federated.strategy import MetaStrategy
from fedmaml.provenance import with_provenance
from fedmaml.results.recorder import read_metrics

COMMON = ("algorithm.name=moml", "algorithm.meta_gradient=first_order", "data.unseen_clients=0",
          "federated.eval_every=0", "federated.eval_clients=1", "evaluation.steps=1",
          "engine.torch_threads=1", "data.partition=iid")

#: case -> (description, overrides, rounds for bare/inprocess/vectorized, rounds for Ray)
CASES: dict[str, tuple[str, tuple[str, ...], int, int]] = {
    "a": ("sinewave MOML, MLP 1-40-40-1, 3 of 100 clients per round, H=1",
          ("data.family=sinusoid", "data.num_clients=100", "model.hidden=[40,40]",
           "algorithm.support_size=5", "federated.clients_per_round=3"), 60, 12),
    "b": ("digits, MLP 64-64-64-10, 10+10 examples, 100 clients per round",
          ("data.family=digits", "data.num_clients=100", "model.hidden=[64,64]",
           "algorithm.support_size=10", "algorithm.query_size=10",
           "federated.clients_per_round=100"), 12, 6),
    "c": ("digits, Conv-4 width 64, 10+10 examples, H=5, 4 clients per round",
          ("data.family=digits", "data.num_clients=100", "model.name=conv4", "model.conv_width=64",
           "algorithm.support_size=10", "algorithm.query_size=10", "algorithm.local_steps=5",
           "federated.clients_per_round=4"), 8, 60),
    "d": ("MNIST-1D, MLP 40-64-64-10, 10+10 examples, 1,000 clients per round",
          ("data.family=mnist1d", "data.mnist1d_samples=10000", "data.num_clients=1000",
           "model.hidden=[64,64]", "algorithm.support_size=10", "algorithm.query_size=10",
           "federated.clients_per_round=1000"), 6, 0),
}

#: Cases also timed with the vectorized engine on 2 torch threads, and with the compute alone.
TWO_THREADS = ("b", "d")
#: Cases also timed as the bare loop inside Flower's own per-client objects (bare_ms_per_round).
FLOWER_FLOOR = ("a", "b")

TARGETS = {
    "a: inprocess <= 1.5x bare": ("a", "inprocess_ms_per_round", "bare_ms_per_round", 1.5, "<="),
    "b: inprocess <= 1.2x bare": ("b", "inprocess_ms_per_round", "bare_ms_per_round", 1.2, "<="),
    "c: ray 1 actor >= 1.6x ray 2 actors": ("c", "ray_1actor_ms_per_round",
                                             "ray_2actor_ms_per_round", 1.6, ">="),
    "b: bare >= 6x vectorized": ("b", "bare_ms_per_round", "vectorized_ms_per_round", 6, ">="),
    "d: bare >= 10x vectorized": ("d", "bare_ms_per_round", "vectorized_ms_per_round", 10, ">="),
    "b: ray >= 60x vectorized": ("b", "ray_ms_per_round", "vectorized_ms_per_round", 60, ">="),
    "b: vectorized <= 1.25x its vmapped compute": ("b", "vectorized_ms_per_round",
                                                   "compute_only.vmapped_ms", 1.25, "<="),
    "d: vectorized <= 1.25x its vmapped compute": ("d", "vectorized_ms_per_round",
                                                   "compute_only.vmapped_ms", 1.25, "<="),
}


def config_for(case: str, rounds: int, out_dir: Path, *extra: str):
    _, overrides, _, _ = CASES[case]
    return load_config(None, [*COMMON, *overrides, f"federated.rounds={rounds}",
                              f"output_dir={out_dir}", f"name=bench-{case}", *extra])


def bare_ms_per_round(cfg, through_flower: bool = False) -> float:
    """Median ms of a round of the bare loop (first round left out: warm-up).

    ``through_flower``: the same loop, but each client's work goes through the Flower objects that
    any per-client engine on Flower's Message API creates for it and nothing else of ours: the
    instruction ``Message`` (content shared by the round), a ``ClientApp`` call with the node's
    ``Context``, a reply ``Message`` holding an ``ArrayRecord`` (encoded once, up front) and a
    ``MetricRecord``, a record in ``Context.state``, and the server reading the reply's metrics and
    taking its record (not decoding it: encoding and decoding are ours). Its ratio to the bare loop
    is a floor for ``inprocess / bare``."""
    setup = setup_for(cfg)
    strategy = MetaStrategy(setup)  # only for its client sampling rule (no Flower involved)
    fed = cfg.federated
    optimizer = ServerOptimizer(fed.server_optimizer, fed.server_lr, fed.server_momentum,
                                (fed.adam_beta1, fed.adam_beta2), fed.adam_eps)
    alg, hp, w = setup.algorithm, setup.hyper, dict(setup.initial_params)
    memories: dict[int, Any] = {}

    def train(cid: int, server_round: int, hp_r) -> tuple[Any, int]:
        tasks = setup.federation.client_tasks(cid)
        memory = memories.get(cid)
        fresh = alg.uses_memory and (memory is None or hp_r.memory_policy == "reinit")
        data = draw_round(tasks, hp_r, round_keys(cfg.seed, [cid], server_round)[0],
                          extra=alg.needs_extra_batch(hp_r), init=fresh)
        delta, memory, _ = client_update(alg, setup.model, setup.loss_fn, hp_r, w, memory, data)
        if memory is not None:
            memories[cid] = memory
        return delta, sum(t.num_examples for t in tasks)

    if through_flower:
        train = _through_flower(train, setup)
    times = []
    with collector.frozen():  # the garbage collector as in a run (fedmaml/collector.py)
        for server_round in range(1, fed.rounds + 1):
            start = time.perf_counter()
            with collector.paused():
                hp_r = hp.with_eta(setup.eta_for_round(server_round))
                deltas, counts = zip(*(train(cid, server_round, hp_r)
                                       for cid in strategy.clients_for_round(server_round)))
                w = optimizer.step(w, aggregate(list(deltas), list(counts), fed.aggregation))
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def _through_flower(train: Callable, setup) -> Callable:
    """``train`` wrapped in Flower's per-client objects only (see ``bare_ms_per_round``)."""
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.supercore.task_identity import TaskIdentity

    from fedmaml.federated import records as R

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    encoded = R.to_record(setup.initial_params)  # one record of the update's size, reused
    app, contexts, results, current = ClientApp(), {}, {}, {}

    @app.train()
    def client(msg: Message, context: Context) -> Message:
        config = msg.content[R.CONFIG]
        cid, server_round = int(context.node_config[R.PARTITION]), int(config[R.ROUND])
        results[cid] = train(cid, server_round, current["hp"])
        context.state["memory"] = encoded
        metrics = MetricRecord({R.NUM_EXAMPLES: results[cid][1], R.PARTITION: cid, "samples": 20,
                                "train-seconds": 0.001, "loss-before": 1.0, "loss-after": 0.5})
        return Message(RecordDict({R.ARRAYS: encoded, R.METRICS: metrics}), reply_to=msg)

    content: dict[int, RecordDict] = {}

    def via_flower(cid: int, server_round: int, hp_r) -> tuple[Any, int]:
        if server_round not in content:
            content.clear()
            content[server_round] = RecordDict({R.ARRAYS: encoded, R.CONFIG: ConfigRecord(
                {R.ROUND: server_round, R.ETA: hp_r.eta})})
        msg = Message(content[server_round], cid + 2, "train", ttl=3600, group_id=str(server_round))
        msg.metadata.__dict__["_message_id"] = f"{server_round}-{cid}"
        current["hp"] = hp_r
        context = contexts.setdefault(cid, Context(run_id=1, node_id=cid + 2, state=RecordDict(),
                                                   node_config={R.PARTITION: cid}, run_config={}))
        reply = app(msg, context)
        metrics, _ = reply.content[R.METRICS], reply.content[R.ARRAYS]  # what the server reads
        assert (int(metrics[R.PARTITION]), int(metrics[R.NUM_EXAMPLES])) == (cid, results[cid][1])
        return results.pop(cid)

    return via_flower


def compute_only(cfg, repeats: int = 5) -> dict[str, float]:
    """The client updates of one round alone (data drawn beforehand, no messages, no server):
    a loop over ``client_update`` vs one ``cohort_update`` -- the ceiling of the vectorized
    engine's speedup, before per-client costs (data draws, messages) that both pay."""
    from fedmaml.engines.vectorized import cohort_update, stack_rounds

    retain_freed_memory()  # as the vectorized engine does
    setup = setup_for(cfg)
    alg, hp, w = setup.algorithm, setup.hyper, setup.initial_params
    cids = MetaStrategy(setup).clients_for_round(2)
    draw = lambda cid, r, init: draw_round(  # noqa: E731
        setup.federation.client_tasks(cid), hp, round_keys(cfg.seed, [cid], r)[0],
        extra=alg.needs_extra_batch(hp), init=init)
    first = stack_rounds([draw(c, 1, alg.uses_memory) for c in cids])
    _, memory, _ = cohort_update(alg, setup.model, setup.loss_fn, hp, w, None, first)
    rounds = [draw(c, 2, False) for c in cids]
    stacked = stack_rounds(rounds)
    memories = [None if memory is None else {k: v[i] for k, v in memory.items()}
                for i in range(len(cids))]
    tasks = [setup.federation.client_tasks(c) for c in cids]
    keys = round_keys(cfg.seed, cids, 2)
    loop, vmapped, drawn = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        draw_cohort(tasks, hp, keys, extra=alg.needs_extra_batch(hp), init=False)
        drawn.append(time.perf_counter() - start)
        start = time.perf_counter()
        for m, d in zip(memories, rounds):
            client_update(alg, setup.model, setup.loss_fn, hp, w, m, d)
        loop.append(time.perf_counter() - start)
        start = time.perf_counter()
        cohort_update(alg, setup.model, setup.loss_fn, hp, w, memory, stacked)
        vmapped.append(time.perf_counter() - start)
    loop_ms, vmapped_ms = 1000 * statistics.median(loop), 1000 * statistics.median(vmapped)
    return {"clients": len(cids), "loop_ms": round(loop_ms, 2), "vmapped_ms": round(vmapped_ms, 2),
            "speedup": round(loop_ms / vmapped_ms, 2),
            "cohort_draw_ms": round(1000 * statistics.median(drawn), 2)}


def engine_round_ms(cfg) -> list[float]:
    """Ms of rounds 2 .. R-1 on ``cfg.engine.name``, from the run's own per-round timestamps."""
    run_dir = run_experiment(cfg, quiet=True)
    stamps = [row["seconds"] for row in read_metrics(run_dir)]  # rows 0..R; row 0 = evaluation
    return [1000 * (b - a) for a, b in zip(stamps[1:-2], stamps[2:-1])]


def engine_ms_per_round(cfg) -> float:
    """Median ms of a round on ``cfg.engine.name``."""
    return statistics.median(engine_round_ms(cfg))


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def wait_for_quiet(max_load: float, max_wait: float) -> float:
    """Wait (up to ``max_wait`` seconds) until the 1-minute load average is below ``max_load``;
    other work on a shared machine distorts timings. Returns the seconds waited."""
    start = time.monotonic()
    while os.getloadavg()[0] >= max_load and time.monotonic() - start < max_wait:
        time.sleep(10)
    return round(time.monotonic() - start, 1)


def run_case(case: str, repeats: int, ray: bool, out_dir: Path, rounds_scale: float,
             compiled: bool = False) -> dict[str, Any]:
    description, _, rounds, ray_rounds = CASES[case]
    rounds = max(4, int(rounds * rounds_scale))
    ray_rounds = max(4, int(ray_rounds * rounds_scale)) if ray_rounds else 0
    samples: dict[str, list[float]] = {}

    def measure(key: str, fn: Callable[[], float]) -> None:
        value = fn()
        torch.set_num_threads(1)  # an engine may have set its own thread count
        samples.setdefault(key, []).append(round(value, 3))
        print(f"  {case}: {key} = {value:.2f} ms/round", file=sys.stderr, flush=True)

    load_before = load()
    for _ in range(repeats):
        measure("bare_ms_per_round", lambda: bare_ms_per_round(config_for(case, rounds, out_dir)))
        if case in FLOWER_FLOOR:
            measure("flower_floor_ms_per_round", lambda: bare_ms_per_round(
                config_for(case, rounds, out_dir), through_flower=True))
        measure("inprocess_ms_per_round", lambda: engine_ms_per_round(
            config_for(case, rounds, out_dir, "engine.name=inprocess")))
        measure("vectorized_ms_per_round", lambda: engine_ms_per_round(
            config_for(case, rounds, out_dir, "engine.name=vectorized")))
        if case in TWO_THREADS:  # the machine's two cores for the batched tensor work
            measure("vectorized_2threads_ms_per_round", lambda: engine_ms_per_round(config_for(
                case, rounds, out_dir, "engine.name=vectorized", "engine.torch_threads=2")))
        if case in TWO_THREADS and compiled:  # rounds 1-2 compile (fresh and returning cohorts)
            measure("vectorized_compiled_ms_per_round", lambda: engine_ms_per_round(config_for(
                case, rounds, out_dir, "engine.name=vectorized", "engine.compile=true")))
    ray_round_ms: dict[str, list[float]] = {}
    if ray and ray_rounds:
        # Ray is slow and its start-up is long: one run per setting (its rounds give the median).
        # Every round's time is kept: Flower's dispatch cycle makes them multiples of about 0.1 s.
        def ray_run(key: str, num_cpus: int) -> float:
            ray_round_ms[key] = [round(x, 1) for x in engine_round_ms(config_for(
                case, ray_rounds, out_dir, "engine.name=ray", f"engine.num_cpus={num_cpus}"))]
            return statistics.median(ray_round_ms[key])

        if case == "c":
            measure("ray_1actor_ms_per_round", lambda: ray_run("ray_1actor", 2))
        measure("ray_2actor_ms_per_round" if case == "c" else "ray_ms_per_round",
                lambda: ray_run("ray_2actor" if case == "c" else "ray", 1))
    out: dict[str, Any] = {"description": description, "rounds": rounds, "ray_rounds": ray_rounds}
    out.update({k: round(statistics.median(v), 3) for k, v in samples.items()})
    if "ray_2actor_ms_per_round" in out:
        out["ray_ms_per_round"] = out["ray_2actor_ms_per_round"]
    bare = out["bare_ms_per_round"]
    out["ratios"] = {f"{k.replace('_ms_per_round', '')}/bare": round(v / bare, 3)
                     for k, v in out.items()
                     if k.endswith("_ms_per_round") and k != "bare_ms_per_round"}
    out["ratios"]["bare/vectorized"] = round(bare / out["vectorized_ms_per_round"], 2)
    if "ray_ms_per_round" in out:
        out["ratios"]["ray/vectorized"] = round(out["ray_ms_per_round"]
                                                / out["vectorized_ms_per_round"], 1)
    if case in TWO_THREADS:
        out["compute_only"] = compute_only(config_for(case, rounds, out_dir))
    out["repeats"] = samples
    if ray_round_ms:
        out["ray_round_ms"] = ray_round_ms
    out["load"] = {"before": load_before, "after": load()}
    return out


def _value(result: dict[str, Any], key: str) -> float | None:
    """``result[key]``, where ``a.b`` reads a nested value."""
    for part in key.split("."):
        if not isinstance(result, dict) or part not in result:
            return None
        result = result[part]
    return result


def check_targets(results: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, (case, num, den, factor, op) in TARGETS.items():
        if case not in results or None in (_value(results[case], num), _value(results[case], den)):
            continue
        ratio = _value(results[case], num) / _value(results[case], den)
        ok = ratio <= factor if op == "<=" else ratio >= factor
        out[name] = {"ratio": round(ratio, 2), "met": ok}
    return out


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--cases", default="a,b,c,d", help="comma-separated cases (default a,b,c,d)")
    p.add_argument("--repeats", type=int, default=3, help="back-to-back repeats (default 3)")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray engine")
    p.add_argument("--rounds-scale", type=float, default=1.0,
                   help="multiply every case's rounds (e.g. 0.5 for a quick look)")
    p.add_argument("--max-load", type=float, default=0.0,
                   help="before each case wait until the load average is below this (0: don't)")
    p.add_argument("--max-wait", type=float, default=1800, help="longest wait for --max-load (s)")
    p.add_argument("--compile", action="store_true",
                   help="also time the vectorized engine with engine.compile=true on b and d")
    args = p.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    torch.set_num_threads(1)
    # The vectorized engine tunes malloc for the whole process; do it up front, so every method
    # and repeat runs with the same allocator (per-client paths were measured unaffected by it).
    retain_freed_memory()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedmaml-bench-") as tmp:
        for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
            if case not in CASES:
                p.error(f"unknown case {case!r}; cases: {', '.join(CASES)}")
            print(f"case {case}: {CASES[case][0]}", file=sys.stderr, flush=True)
            waited = wait_for_quiet(args.max_load, args.max_wait) if args.max_load else 0.0
            results[case] = run_case(case, args.repeats, not args.no_ray, Path(tmp),
                                     args.rounds_scale, args.compile)
            results[case]["waited_for_quiet_s"] = waited
            results["machine"] = machine()
            results["targets"] = check_targets(results)
            args.out.write_text(json.dumps(with_provenance(results), indent=2) + "\n")  # partial results survive
    print(json.dumps(results["targets"], indent=2))
    return 0


if __name__ == "__main__":
    from fedmaml.cli import run_command  # Ctrl-C: "interrupted", exit 130, no traceback

    raise SystemExit(run_command(main))
