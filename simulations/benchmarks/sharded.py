"""The sharded engine (fedmaml/engines/sharded.py) against the single-process vectorized engine
(docs/performance.md, "The sharded engine").

Each run is a fresh process (its peak resident memory its own), on a local Ray instance that the
run starts and stops; what is measured:

* **case d** of simulations/benchmarks/engines.py (MNIST-1D, MLP 40-64-64-10, 1,000 clients per
  round, MOML first order, 1 torch thread): the vectorized engine, 1 shard of 1 CPU and 2 shards of
  1 CPU each, alternating, ``--repeats`` times. A round's time is read from the run's metrics.jsonl
  (``seconds``, stamped after each round): the median of rounds 2..R-1 (round 1 warms up, round R
  also evaluates). Per run also: the seconds the driver spent inside the grid's
  ``send_and_receive`` and the seconds each actor spent inside its own grid (its compute), whence
  the driver's part of a sharded round (splitting, sending ``w``, joining the replies);
* **the constants of the scaling formula** (docs/performance.md): a shard call's round trip with
  case d's ``w``; moving 1,000 of case d's updates from an actor to the driver; joining them;
* **a federation of 10,000,000 clients** (sinusoid, MLP 1-40-40-1, MOML first order, K=5, as
  simulations/benchmarks/scale.py) at 0.1 % sampling (10,000 clients a round), ``--big-rounds``
  rounds, on 2 shards and on the single-process vectorized engine: round time, each process's peak
  resident memory (the driver's and each actor's) and each shard's memory bank.

``--one-at-a-time`` adds case d's 2 shards called one after the other (each waits for the
previous one's answer; what running together costs each shard) and a probe of the cores' contention:
a compute-bound and a memory-bound loop, in one process alone and in two at once.

``--baseline CHECKOUT`` also runs case d's sharded settings with another checkout's code (e.g. the
version before a change), alternating with this one's, each run in a fresh process.

Every result carries the load average before and after it. The machine's cores are shared: two
shards of one CPU can only beat one shard when two cores are free. Run (quiet machine):

    PYTHONPATH=. .venv/bin/python simulations/benchmarks/sharded.py --out docs/results/sharded.json

Output: ``{"d": {"runs": [...], "median_ms_per_round": {...}, ...}, "big": {...}, "machine": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedmaml.provenance import with_provenance

ROOT = Path(__file__).resolve().parents[2]
BIG = ("data.family=sinusoid", "data.num_clients=10000000", "data.unseen_clients=10",
       "model.hidden=[40,40]", "algorithm.name=moml", "algorithm.meta_gradient=first_order",
       "algorithm.support_size=5", "federated.fraction=0.001", "federated.eval_every=0",
       "federated.eval_clients=20", "evaluation.steps=5", "engine.torch_threads=1")


def child(kind: str, engine: str, shards: int, rounds: int, out_dir: str) -> dict[str, Any]:
    """One run in this process: ``kind`` d or big, on ``engine`` (vectorized or sharded)."""
    import torch

    from fedmaml.config import load_config
    from fedmaml.engines.sharded import ShardedGrid, run_sharded
    from fedmaml.engines.vectorized import VectorizedGrid, run_vectorized
    from fedmaml.experiment import quiet_frameworks
    from fedmaml.federated.client_app import make_client_app
    from fedmaml.federated.server_app import make_server_app
    from fedmaml.federated.setup import setup_for
    from fedmaml.results.recorder import read_metrics

    quiet_frameworks()
    torch.set_num_threads(1)
    label = engine
    if engine == "sharded-seq":
        engine = "sharded"
        serialize_shard_calls()
    extra = [f"engine.name={engine}", f"engine.shards={max(shards, 1)}", "engine.num_cpus=1",
             f"federated.rounds={rounds}", f"output_dir={out_dir}",
             f"name={kind}-{engine}-{shards}"]
    sys.path.insert(0, str(Path(__file__).parent))
    from scale import timed_grid  # noqa: E402 - the grid timer scale.py uses

    if kind == "d":
        from engines import config_for  # noqa: E402 - the case as engines.py defines it

        cfg = config_for("d", rounds, Path(out_dir), *extra)
    else:
        cfg = load_config(None, [*BIG, *extra])
    setup = setup_for(cfg)
    nodes = setup.federation.num_clients + setup.federation.num_unseen
    in_grid: list[float] = []
    cpu_marks: list[tuple[float, float]] = []  # this thread's CPU seconds at each call's start, end

    import fedmaml.engines.sharded as sharded_module
    import fedmaml.engines.vectorized as vectorized_module
    sharded_module.ShardedGrid = timed_grid(ShardedGrid, in_grid, cpu_marks)
    vectorized_module.VectorizedGrid = timed_grid(VectorizedGrid, in_grid, cpu_marks)
    run_dir = Path(out_dir) / cfg.name
    server_app, client_app = make_server_app(cfg, run_dir, quiet=True), make_client_app(cfg)
    baseline = peak_rss_mb()
    start = time.perf_counter()
    if engine == "vectorized":
        grid = run_vectorized(server_app, client_app, nodes, cfg)
        bank = grid.bank
        shards_out = [{"bank_mb": round((bank.nbytes if bank else 0) / 2 ** 20, 1),
                       "stored_clients": bank.num_stored if bank else 0}]
        grid.close()
    else:
        done = run_sharded(server_app, client_app, nodes, cfg, run_dir)
        shards_out = [{"shard": s.get("shard"), "node_id": s.get("node_id", "")[:12],
                       "peak_rss_mb": round(s.get("peak_rss_mb", 0), 1),
                       "bank_mb": round(s.get("bank_bytes", 0) / 2 ** 20, 1),
                       "stored_clients": s.get("stored_clients"),
                       "busy_s": round(s.get("busy_seconds", 0), 3),
                       **middle_medians(s.get("train_calls", []), rounds)}
                      for s in done["shards"]]
    total = time.perf_counter() - start
    rows = read_metrics(run_dir)
    stamps = [r["seconds"] for r in rows]
    rounds_s = [b - a for a, b in zip(stamps[:-1], stamps[1:])]  # rounds 1..R
    train_in_grid = in_grid[1:1 + rounds]  # grid calls: [eval 0, train 1..R, eval R]
    middle = slice(1, -1) if rounds > 2 else slice(0, None)
    # the driver's CPU per round (this thread, from one training call's start to the next one's):
    # the serial part of a round, whatever else shares the cores
    starts = [c for c, _ in cpu_marks[1:2 + rounds]]
    driver_cpu = [b - a for a, b in zip(starts[:-1], starts[1:])]
    train_marks = cpu_marks[1:1 + rounds]
    return {"kind": kind, "engine": label, "shards": shards if engine == "sharded" else 0,
            "rounds": rounds, "per_round": len(rows[1]["clients"]),
            "ms_per_round": round(1000 * statistics.median(rounds_s[middle]), 2),
            "round_ms": [round(1000 * r, 2) for r in rounds_s],
            "in_grid_ms": round(1000 * statistics.median(train_in_grid[middle]), 2),
            "driver_cpu_ms": round(1000 * statistics.median(driver_cpu[middle]), 2),
            "driver_cpu_in_grid_ms": round(1000 * statistics.median(
                [b - a for a, b in train_marks][middle]), 2),
            "total_s": round(total, 2), "driver_peak_rss_mb": round(peak_rss_mb(), 1),
            "driver_baseline_rss_mb": round(baseline, 1), "shards_detail": shards_out,
            "failures": sum(r.get("failures", 0) for r in rows[1:])}


def serialize_shard_calls() -> None:
    """Make the driver call its shards one after the other (each waits for the previous one's
    answer): each shard's CPU per call then shows what its work costs with no other shard running
    at the same time; against the usual calls, what running together costs each shard (the two
    cores' shared cache and memory bandwidth)."""
    from fedmaml.engines.sharded import ShardActors

    together = ShardActors.call

    def one_at_a_time(self, method, args, *more, **kw):  # type: ignore[no-untyped-def]
        out = {}
        for k, a in args.items():
            out.update(together(self, method, {k: a}, *more, **kw))
        return out

    ShardActors.call = one_at_a_time


def memory_contention(repeats: int = 7) -> dict[str, Any]:
    """What one core's work costs when the other core works too: CPU ms of a small matrix product
    (in cache: compute) and of scaling a 16 MB array (memory bound), in one process alone and in
    two processes at once (medians of ``repeats``)."""
    def run(k: int) -> list[dict[str, float]]:
        procs = [subprocess.Popen([sys.executable, "-c", _PROBE, str(repeats)],
                                  stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1",
                                       "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
                 for _ in range(k)]
        return [json.loads(p.communicate()[0]) for p in procs]

    alone, together = run(1) + run(1), run(2) + run(2)
    out: dict[str, Any] = {"load": load()}
    for probe in ("compute_ms", "memory_ms"):
        a = statistics.median(r[probe] for r in alone)
        t = statistics.median(r[probe] for r in together)
        out[probe] = {"alone": round(a, 2), "two_at_once": round(t, 2),
                      "ratio": round(t / a, 3)}
    return out


_PROBE = """
import json, sys, time
import numpy as np
a, b = np.random.rand(64, 64).astype(np.float32), np.random.rand(64, 64).astype(np.float32)
big = np.random.rand(4_000_000).astype(np.float32)
def cpu_ms(f, n=int(sys.argv[1])):
    f(); ts = []
    for _ in range(n):
        t = time.thread_time(); f(); ts.append(time.thread_time() - t)
    return 1000 * sorted(ts)[n // 2]
print(json.dumps({"compute_ms": cpu_ms(lambda: [a @ b for _ in range(2000)]),
                  "memory_ms": cpu_ms(lambda: [big * 1.0001 for _ in range(20)])}))
"""


def middle_medians(calls: list, rounds: int) -> dict[str, float]:
    """A shard's median seconds and CPU seconds per training call over rounds 2..R-1."""
    kept = [(s, c) for r, s, c in calls if 1 < r < rounds] or [(s, c) for _, s, c in calls]
    if not kept:
        return {}
    return {"train_ms": round(1000 * statistics.median(s for s, _ in kept), 2),
            "train_cpu_ms": round(1000 * statistics.median(c for _, c in kept), 2)}


class Echo:
    """An actor for the per-call constants: answers a message, hands out a stack of updates."""

    def echo(self, msg: Any) -> Any:
        return msg

    def stack(self, rows: int, width: int) -> Any:
        import numpy as np

        return {"w": np.ones((rows, width), dtype=np.float32)}


def constants(out_dir: str, repeats: int = 30) -> dict[str, Any]:
    """The constants of the scaling formula, measured on this machine: a shard call's round trip
    with case d's ``w``; moving case d's 1,000 updates from an actor to the driver through the
    object store; joining them into one record (codec.encode_joined)."""
    import numpy as np
    import ray
    import torch
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedmaml.config import load_config
    from fedmaml.engines.ray_engine import stop_ray
    from fedmaml.engines.sharded import connect
    from fedmaml.federated import codec
    from fedmaml.federated import records as R
    from fedmaml.federated.setup import setup_for

    sys.path.insert(0, str(Path(__file__).parent))
    from engines import config_for  # noqa: E402

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    cfg = config_for("d", 2, Path(out_dir), "engine.shards=1", "engine.num_cpus=1")
    w = setup_for(cfg).initial_params
    width = sum(v.numel() for v in w.values())
    msg = Message(RecordDict({R.ARRAYS: codec.encode(w), R.CONFIG: ConfigRecord({R.COHORT:
                                                                                list(range(500))})}),
                  2, "train", group_id="1")
    session = connect(load_config(None, ["engine.shards=1"]).engine)
    try:
        actor = ray.remote(Echo).options(num_cpus=1).remote()
        ray.get(actor.echo.remote(msg))
        calls, moves = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            ray.get(actor.echo.remote(msg))
            calls.append(time.perf_counter() - t)
        for _ in range(max(repeats // 3, 3)):
            t = time.perf_counter()
            got = ray.get(actor.stack.remote(1000, width))
            moves.append(time.perf_counter() - t)
            del got
        half = np.ones((500, width), dtype=np.float32)
        joins = []
        for _ in range(max(repeats // 3, 3)):
            t = time.perf_counter()
            codec.encode_joined({"w": [half, half]})
            joins.append(time.perf_counter() - t)
    finally:
        stop_ray(session)
    mb = 1000 * width * 4 / 2 ** 20
    return {"w_bytes": width * 4, "update_bytes": width * 4,
            "call_ms": round(1000 * statistics.median(calls), 3),
            "move_1000_updates_ms": round(1000 * statistics.median(moves), 2),
            "move_ms_per_mb": round(1000 * statistics.median(moves) / mb, 3),
            "join_1000_updates_ms": round(1000 * statistics.median(joins), 2),
            "join_ms_per_mb": round(1000 * statistics.median(joins) / mb, 3), "load": load(),
            "torch_threads": torch.get_num_threads()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_child(kind: str, engine: str, shards: int, rounds: int, out_dir: str,
              root: Path = ROOT) -> dict:
    """One run in a fresh process, with the code of the checkout ``root`` (this one by default)."""
    script = root / "simulations" / "benchmarks" / "sharded.py"
    out_dir = tempfile.mkdtemp(prefix=f"{kind}-{engine}-{shards}-", dir=out_dir)  # its own run
    cmd = [sys.executable, str(script), "--child", kind, engine, str(shards), str(rounds), out_dir]
    before = load()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load_before"], out["load_after"] = before, load()
    out["code"] = "this" if root == ROOT else "baseline"
    print(json.dumps({k: out[k] for k in ("code", "kind", "engine", "shards", "ms_per_round",
                                          "in_grid_ms", "load_after")}), file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="sharded.json")
    p.add_argument("--repeats", type=int, default=3, help="case d: alternating repeats")
    p.add_argument("--rounds", type=int, default=8, help="case d: rounds per run")
    p.add_argument("--big-rounds", type=int, default=6, help="10M clients: rounds per run")
    p.add_argument("--skip-big", action="store_true", help="only case d")
    p.add_argument("--skip-d", action="store_true", help="only the 10M-client federation")
    p.add_argument("--constants-only", action="store_true",
                   help="only the per-call constants of the scaling formula")
    p.add_argument("--baseline", type=Path, default=None,
                   help="another checkout of fedmaml (e.g. a previous version): case d's sharded "
                        "settings also run with its code, alternating with this one's")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="case d: also 2 shards called one after the other (what running together "
                        "costs each shard), and the cores' memory contention")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, engine, shards, rounds, out_dir = args.child
        print(json.dumps(child(kind, engine, int(shards), int(rounds), out_dir)))
        return 0
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                          "platform": platform.platform()}}
    with tempfile.TemporaryDirectory(prefix="fedmaml-sharded-bench-") as tmp:
        if args.constants_only:
            result["constants"] = constants(tmp)
            Path(args.out).write_text(json.dumps(with_provenance(result), indent=1))
            return 0
        result["constants"] = constants(tmp)
        if not args.skip_d:
            runs = []
            settings = [(ROOT, "vectorized", 0), (ROOT, "sharded", 1), (ROOT, "sharded", 2)]
            if args.one_at_a_time:
                settings.append((ROOT, "sharded-seq", 2))
                result["memory_contention"] = memory_contention()
            if args.baseline is not None:
                settings += [(args.baseline.resolve(), "sharded", 1),
                             (args.baseline.resolve(), "sharded", 2)]
            for _ in range(args.repeats):  # alternating, so load changes hit every setting alike
                for root, engine, shards in settings:
                    runs.append(run_child("d", engine, shards, args.rounds, tmp, root))
            medians = {f"{'baseline-' if root != ROOT else ''}{e}-{s}": statistics.median(
                r["ms_per_round"] for r in runs
                if (r["code"], r["engine"], r["shards"]) == (
                    "this" if root == ROOT else "baseline", e, s))
                for root, e, s in settings}
            result["d"] = {
                "runs": runs, "median_ms_per_round": medians,
                "rounds_per_s_2_over_1_shard": round(medians["sharded-1"] / medians["sharded-2"], 3),
                "one_shard_minus_vectorized_ms": round(medians["sharded-1"]
                                                       - medians["vectorized-0"], 2),
                # the busiest shard's CPU per training call: the shards' own work, whoever else
                # waits for a core
                "busiest_shard_cpu_ms": {
                    f"{e}-{s}": statistics.median(
                        max(d.get("train_cpu_ms", 0) for d in r["shards_detail"]) for r in runs
                        if (r["code"], r["engine"], r["shards"]) == ("this", e, s))
                    for root, e, s in settings if root == ROOT and e != "vectorized"}}
        if not args.skip_big:
            result["big"] = {"runs": [run_child("big", "sharded", 2, args.big_rounds, tmp),
                                      run_child("big", "vectorized", 0, args.big_rounds, tmp)]}
    Path(args.out).write_text(json.dumps(with_provenance(result), indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from fedmaml.cli import run_command  # Ctrl-C: "interrupted", exit 130, no traceback

    raise SystemExit(run_command(main))
