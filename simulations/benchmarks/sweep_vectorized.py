"""Benchmark of vectorized sweeps (``fedmaml sweep --vectorize``, fedmaml/engines/run_batch.py).

Measures the wall time of a sinewave sweep (``configs/sinewave_centralized.yaml``: MOML, 25
clients, 3 per round) of ``--etas`` x ``--betas`` x ``--seeds`` runs trained as vectorized batches,
against one of its runs alone on the in-process engine (``fedmaml run``), both end to end (set-up,
training, evaluation rounds, figures, run directories). Each measurement runs in a fresh process.

    PYTHONPATH=. python simulations/benchmarks/sweep_vectorized.py --rounds 4000 --jobs 1 2 \\
        --out docs/results/sweep_vectorized.json
    PYTHONPATH=. python simulations/benchmarks/sweep_vectorized.py --rounds 40000 --seeds 0 \\
        --jobs 2 --skip-alone      # one method's full 5 x 5 grid at the paper's budget

``--compile`` sets ``engine.compile: true`` for the sweep (the batch's update over runs is
torch.compile'd) and times the run alone on the engine recommended for it then (vectorized,
compiled): each side with what makes it fastest. torch.compile keeps what it compiled in a cache
on disk (``TORCHINDUCTOR_CACHE_DIR``, by default under the system's temporary directory), which
a later process with the same shapes reads instead of compiling again; ``--cold-cache`` gives
both measured processes a new, empty cache, as on a machine that never compiled these shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedmaml.provenance import with_provenance

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "sinewave_centralized.yaml"


def timed(command: list[str], cache: str | None = None) -> float:
    """Wall seconds of a fresh process running ``command`` (it must succeed); ``cache``: its
    torch.compile cache directory (None: the default one)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if cache is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4000)
    p.add_argument("--etas", default="0.1,0.05,0.01,0.005,0.001")
    p.add_argument("--betas", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--seeds", default="0-4")
    p.add_argument("--jobs", type=int, nargs="+", default=[1, 2],
                   help="worker processes of the vectorized sweep (each a measurement)")
    p.add_argument("--skip-alone", action="store_true", help="do not time the run alone")
    p.add_argument("--compile", action="store_true",
                   help="engine.compile=true for the sweep, and the run alone on the engine the "
                        "docs recommend for it then (vectorized, compiled)")
    p.add_argument("--cold-cache", action="store_true",
                   help="with --compile: an empty torch.compile cache for each side")
    p.add_argument("--out", help="JSON file for the numbers")
    a = p.parse_args()
    python = sys.executable
    common = [f"federated.rounds={a.rounds}", *(["engine.compile=true"] if a.compile else [])]
    alone_engine = "vectorized" if a.compile else "inprocess"
    if a.cold_cache and not a.compile:
        p.error("--cold-cache is about torch.compile's cache: give --compile too")
    results: dict = {"rounds": a.rounds, "compile": a.compile, "alone_engine": alone_engine,
                     "compile_cache": ("cold" if a.cold_cache else "default") if a.compile else None,
                     "grid": {"eta": a.etas, "beta": a.betas, "seeds": a.seeds},
                     "load_before": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        if not a.skip_alone:
            results["alone_seconds"] = timed(
                [python, "-m", "fedmaml", "run", str(CONFIG), *common,
                 f"engine.name={alone_engine}", f"output_dir={tmp}", "name=alone", "--quiet"],
                cache=f"{tmp}/cache-alone" if a.cold_cache else None)
            print(f"one run alone ({alone_engine}{', compiled' if a.compile else ''}): "
                  f"{results['alone_seconds']:.1f} s", flush=True)
        for jobs in a.jobs:
            seconds = timed([python, "-m", "fedmaml", "sweep", str(CONFIG), *common,
                             "--grid", f"algorithm.eta={a.etas}", "--grid",
                             f"algorithm.beta={a.betas}", "--seeds", a.seeds, "--vectorize",
                             "--jobs", str(jobs), "--sweep-dir", f"{tmp}/sweep-{jobs}", "--quiet"],
                            cache=f"{tmp}/cache-{jobs}" if a.cold_cache else None)
            runs = sum(1 for d in Path(f"{tmp}/sweep-{jobs}").iterdir() if d.is_dir())
            line = {"jobs": jobs, "runs": runs, "seconds": seconds}
            if "alone_seconds" in results:
                line["x_alone"] = seconds / results["alone_seconds"]
            results.setdefault("vectorized", []).append(line)
            print(f"{runs} runs vectorized, --jobs {jobs}: {seconds:.1f} s"
                  + (f" = {line['x_alone']:.2f}x one run alone" if "x_alone" in line else ""),
                  flush=True)
    results["load_after"] = os.getloadavg()
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(with_provenance(results), indent=1) + "\n")


if __name__ == "__main__":
    from fedmaml.cli import run_command  # Ctrl-C: "interrupted", exit 130, no traceback

    raise SystemExit(run_command(main))
