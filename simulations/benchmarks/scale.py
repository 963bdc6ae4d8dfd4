"""Cross-device runs with 10k to 1M clients: seconds per round, server cost, peak memory
(docs/performance.md).

Each run is a fresh process (so its peak resident memory is its own): sinusoid tasks, MLP 1-40-40-1,
MOML first order, K=5, 10 rounds, ``federated.fraction`` of the clients per round (1 % by default),
evaluation on 20 trained and 10 unseen clients before the first and after the last round. It
reports:

* ``round_s``: median wall seconds of rounds 2..9 (round 1 and round 10 also start memories and
  evaluate);
* ``server_ms``: the part of a round spent outside the grid's ``send_and_receive`` (sampling,
  building instructions, decoding and averaging updates, the server optimizer, recording): the
  server's cost, which must not grow with the number of clients at a fixed cohort size;
* ``peak_rss_mb``: the process's peak resident memory (``ru_maxrss``), and ``baseline_rss_mb``
  before the run started (imports, data);
* for the vectorized engine, the memory bank: clients stored, bytes, RAM or memory-mapped files.

``--fixed K`` adds runs with K clients per round at every size, to show that the server cost stays
flat as the federation grows. Run:

    PYTHONPATH=. .venv/bin/python simulations/benchmarks/scale.py --out scale.json

Output: ``{"runs": [{"clients", "engine", "per_round", "round_s", "server_ms", "peak_rss_mb", ...},
...], "machine": {...}}``.
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

ROUNDS = 10


def child(clients: int, engine: str, per_round: int, budget_mb: float, out_dir: str) -> dict:
    """One run in this process; returns its measurements."""
    import torch

    from fedmaml.config import load_config
    from fedmaml.engines.inprocess import InProcessGrid, run_inprocess
    from fedmaml.engines.vectorized import VectorizedGrid, run_vectorized
    from fedmaml.experiment import quiet_frameworks
    from fedmaml.federated.client_app import make_client_app
    from fedmaml.federated.server_app import make_server_app
    from fedmaml.federated.setup import setup_for
    from fedmaml.results.recorder import read_metrics

    quiet_frameworks()
    torch.set_num_threads(1)
    sampling = (f"federated.clients_per_round={per_round}" if per_round
                else "federated.fraction=0.01")
    cfg = load_config(None, [
        f"name=scale-{clients}-{engine}", f"output_dir={out_dir}", "seed=0",
        "data.family=sinusoid", f"data.num_clients={clients}", "data.unseen_clients=10",
        "model.hidden=[40,40]", "algorithm.name=moml", "algorithm.support_size=5",
        sampling, f"federated.rounds={ROUNDS}", "federated.eval_every=0",
        "federated.eval_clients=20", "evaluation.steps=5", f"engine.name={engine}",
        "engine.torch_threads=1", f"engine.memory_budget_mb={budget_mb}"])
    setup = setup_for(cfg)
    baseline = peak_rss_mb()
    in_grid: list[float] = []  # seconds inside send_and_receive, per call

    # Time the grid calls: the rest of a round is the server's work.
    import fedmaml.engines.inprocess as inprocess_module
    import fedmaml.engines.vectorized as vectorized_module
    inprocess_module.InProcessGrid = timed_grid(InProcessGrid, in_grid)
    vectorized_module.VectorizedGrid = timed_grid(VectorizedGrid, in_grid)
    nodes = setup.federation.num_clients + setup.federation.num_unseen
    run_dir = Path(out_dir) / cfg.name
    server_app, client_app = make_server_app(cfg, run_dir, quiet=True), make_client_app(cfg)
    start = time.perf_counter()
    if engine == "vectorized":
        grid = run_vectorized(server_app, client_app, nodes, cfg)
    else:
        grid = run_inprocess(server_app, client_app, nodes)
    total = time.perf_counter() - start
    rows = read_metrics(run_dir)
    stamps = [r["seconds"] for r in rows]
    rounds = [b - a for a, b in zip(stamps[:-1], stamps[1:])]  # rounds 1..R
    # grid calls: [eval 0, train 1, train 2, ..., train R, eval R]
    train_in_grid = in_grid[1:1 + ROUNDS]
    server = [r - g for r, g in zip(rounds[1:-1], train_in_grid[1:-1])]
    out: dict[str, Any] = {
        "clients": clients, "engine": engine,
        "per_round": len(rows[1]["clients"]),
        "round_s": round(statistics.median(rounds[1:-1]), 4),
        "first_round_s": round(rounds[0], 4),
        "server_ms": round(1000 * statistics.median(server), 2),
        "total_s": round(total, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1), "baseline_rss_mb": round(baseline, 1),
        "trained_clients": len({c for r in rows[1:] for c in r["clients"]}),
        "seen_loss_before": rows[0]["eval"]["seen.loss.mean"],
        "seen_loss_after": rows[-1]["eval"]["seen.loss.mean"],
        "memory_budget_mb": budget_mb,
    }
    if engine == "vectorized":
        bank = grid.bank
        out["bank"] = {"stored": bank.num_stored, "mb": round(bank.nbytes / 2 ** 20, 1),
                       "on_disk": bank.on_disk}
        out["stats"] = vars(grid.stats)
        grid.close()
    return out


def timed_grid(cls: type, seconds: list[float],
               cpu_marks: list[tuple[float, float]] | None = None) -> type:
    """``cls`` (a grid class) whose ``send_and_receive`` appends the wall seconds of each call to
    ``seconds`` and, with ``cpu_marks``, this thread's CPU seconds at the call's start and end."""
    class Timed(cls):
        def send_and_receive(self, messages, *, timeout=None):
            start, cpu = time.perf_counter(), time.thread_time()
            replies = super().send_and_receive(messages, timeout=timeout)
            seconds.append(time.perf_counter() - start)
            if cpu_marks is not None:
                cpu_marks.append((cpu, time.thread_time()))
            return replies
    return Timed


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_child(clients: int, engine: str, per_round: int, budget_mb: float, out_dir: str) -> dict:
    cmd = [sys.executable, __file__, "--child", str(clients), engine, str(per_round),
           str(budget_mb), out_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        clients, engine, per_round, budget, out_dir = argv[1:6]
        print(json.dumps(child(int(clients), engine, int(per_round), float(budget), out_dir)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--engines", default="vectorized,inprocess",
                   help="engines to run (inprocess is skipped above --inprocess-max clients)")
    p.add_argument("--inprocess-max", type=int, default=100_000)
    p.add_argument("--fixed", type=int, default=100,
                   help="also run every size with this many clients per round (0: skip)")
    p.add_argument("--disk-budget-mb", type=float, default=64,
                   help="also run the largest size with this bank budget (memory-mapped bank)")
    p.add_argument("--max-load", type=float, default=0.0,
                   help="before each run wait until the load average is below this (0: don't)")
    p.add_argument("--max-wait", type=float, default=900, help="longest wait for --max-load (s)")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    plan = []
    for n in sizes:
        for engine in args.engines.split(","):
            if engine == "inprocess" and n > args.inprocess_max:
                continue
            plan.append((n, engine, 0, 4096.0))
            if args.fixed:
                plan.append((n, engine, args.fixed, 4096.0))
    if args.disk_budget_mb and "vectorized" in args.engines:
        plan.append((max(sizes), "vectorized", 0, args.disk_budget_mb))
    results: dict[str, Any] = {"runs": [], "machine": {
        "cpus": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "load_before": os.getloadavg()}}
    with tempfile.TemporaryDirectory(prefix="fedmaml-scale-") as tmp:
        for n, engine, per_round, budget in plan:
            print(f"{n} clients, {engine}, {'1 %' if not per_round else per_round} per round, "
                  f"budget {budget:g} MB ...", file=sys.stderr, flush=True)
            waited = time.monotonic()
            while args.max_load and os.getloadavg()[0] >= args.max_load \
                    and time.monotonic() - waited < args.max_wait:
                time.sleep(10)  # other work on a shared machine distorts timings
            waited = round(time.monotonic() - waited, 1)
            load_before = [round(x, 2) for x in os.getloadavg()]
            r = run_child(n, engine, per_round, budget, tmp)
            r["load"] = {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]}
            r["waited_s"] = waited
            results["runs"].append(r)
            print(f"  {r['round_s']:.3f} s/round, server {r['server_ms']:.1f} ms, peak "
                  f"{r['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
            args.out.write_text(json.dumps(with_provenance(results), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from fedmaml.cli import run_command  # Ctrl-C: "interrupted", exit 130, no traceback

    raise SystemExit(run_command(main))
