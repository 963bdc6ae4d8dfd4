"""One sinewave MOML run (K = 1) with ``fedmaml run`` against the MOML paper's public script, per
meta-step, alternating fresh processes (docs/performance.md#one-run-against-the-public-script).

The same work on both sides: MOML on the 25 sinewave tasks, 3 tasks (clients) per meta-step, K = 1
support and query examples, one inner step of 0.01, the first-order meta-gradient scaled by beta,
eta = 0.005, beta = 0.3 (``configs/sinewave_centralized.yaml``; the public script's ``--alg MOML
--K 1 --lr 0.005 --beta 0.3``), ``--steps`` meta-steps. Compared **per meta-step, evaluation
excluded on both sides**: the public script's own "time per iteration" (its timer covers each
step's task sampling, inner loops and meta-update; it evaluates every 4,000 steps and tests after
the loop, outside the timer), and fedmaml's mean round time from metrics.jsonl (``seconds`` is
stamped after every round) over the rounds that do not evaluate. A fedmaml round also writes its
metrics row, keeps the memories in the clients' stores and draws every client's data from its own
counter-based stream. Each process's wall time (imports and set-up included) is recorded too.

The public code is not part of fedmaml: ``--public-dir`` is the ``sinewave`` directory of the
paper's repository (its ``train.py``, ``config.py`` and ``src``). Run:

    PYTHONPATH=. python simulations/benchmarks/public_moml.py --public-dir PATH/TO/sinewave \\
        --steps 2000 --repeats 3 --out docs/results/public_moml.json

Engines: ``--engines inprocess,vectorized,vectorized+compile`` (runs alone; the last with
``engine.compile: true``, whose compiling rounds are reported apart: see :func:`round_ms`) and ``--batch 5`` (the same run with 5
seeds as one vectorized batch, ``fedmaml sweep --vectorize``: its time per run-step is a round's time
divided by the runs; 0 skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedmaml.provenance import with_provenance
from fedmaml.results.recorder import read_metrics

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "sinewave_centralized.yaml"

#: Runs the public train.py for ``argv[1]`` meta-steps of MOML K = 1 with seed 0 (its config
#: module's globals are read by train.py at import, so they are set before it runs).
PUBLIC_RUNNER = """
import runpy, sys
sys.path.insert(0, '.')
import config
config.total_iterations, config.seeds = int(sys.argv[1]), [0]
sys.argv = ['train.py', '--alg', 'MOML', '--K', '1', '--lr', '0.005', '--beta', '0.3']
runpy.run_path('train.py', run_name='__main__')
"""


def timed(command: list[str], cwd: Path) -> tuple[float, str]:
    """Wall seconds and stdout of a fresh process running ``command`` (it must succeed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run(command, check=True, env=env, cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - start, done.stdout


def public_step_ms(public_dir: Path, steps: int) -> dict[str, float]:
    (public_dir / "results").mkdir(exist_ok=True)  # where train.py writes its traces
    wall, out = timed([sys.executable, "-c", PUBLIC_RUNNER, str(steps)], public_dir)
    found = re.search(r"time per iteration: avg:([0-9.eE+-]+)", out)
    if found is None:
        raise RuntimeError(f"the public script printed no time per iteration:\n{out[-2000:]}")
    return {"step_ms": float(found.group(1)), "wall_s": wall}  # it prints milliseconds


def round_ms(run_dir: Path, runs: int = 1, compiles: bool = False) -> dict[str, float]:
    """Mean and median ms of the rounds that do not evaluate (per run-step: divided by ``runs``).

    With ``engine.compile`` (``compiles``) a round that compiles (the first of each cohort shape, and the first
    after eta's decay, which torch.compile specialises on) takes seconds: ``step_ms`` is then the
    mean of the other rounds, and those rounds are reported apart (``compile_rounds``,
    ``compile_s``: their seconds in all); ``step_ms_all`` is the mean over every round, compiling
    ones included (the cost per step of this run's length)."""
    rows = read_metrics(run_dir)
    stamps = {r["round"]: r["seconds"] for r in rows}
    evaluated = {r["round"] for r in rows if r.get("eval")}
    ms = [1000 * (stamps[k] - stamps[k - 1]) / runs for k in stamps
          if k - 1 in stamps and k not in evaluated]
    compiling = [m for m in ms if compiles and m > COMPILE_MS]
    steady = [m for m in ms if not (compiles and m > COMPILE_MS)]
    return {"step_ms": statistics.mean(steady), "median_step_ms": statistics.median(steady),
            "step_ms_all": statistics.mean(ms), "compile_rounds": len(compiling),
            "compile_s": sum(compiling) / 1000}


#: A round this much slower than a sinewave round (about 1-3 ms) compiled something.
COMPILE_MS = 100.0

#: Engines as --engines names them: the config overrides of each.
ENGINES = {"inprocess": ("engine.name=inprocess",), "vectorized": ("engine.name=vectorized",),
           "vectorized+compile": ("engine.name=vectorized", "engine.compile=true")}


def fedmaml_run(engine: str, steps: int, tmp: Path, tag: str) -> dict[str, float]:
    wall, _ = timed([sys.executable, "-m", "fedmaml", "run", str(CONFIG),
                     f"federated.rounds={steps}", *ENGINES[engine], f"output_dir={tmp}",
                     f"name={tag}", "--quiet"], ROOT)
    return {**round_ms(tmp / tag, compiles="engine.compile=true" in ENGINES[engine]),
            "wall_s": wall}


def fedmaml_batch(runs: int, steps: int, tmp: Path, tag: str) -> dict[str, float]:
    wall, _ = timed([sys.executable, "-m", "fedmaml", "sweep", str(CONFIG),
                     f"federated.rounds={steps}", "--seeds", f"0-{runs - 1}", "--vectorize",
                     "--jobs", "1", "--sweep-dir", str(tmp / tag), "--quiet"], ROOT)
    first = sorted(d for d in (tmp / tag).iterdir() if (d / "metrics.jsonl").exists())[0]
    return {**round_ms(first, runs), "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--public-dir", type=Path, required=True,
                   help="the sinewave directory of the MOML paper's public code")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engines", default="inprocess,vectorized,vectorized+compile")
    p.add_argument("--batch", type=int, default=5, help="seeds in one vectorized batch (0: none)")
    p.add_argument("--out", help="JSON file for the numbers")
    a = p.parse_args()
    if not (a.public_dir / "train.py").exists():
        p.error(f"--public-dir {a.public_dir}: no train.py there (give the public code's sinewave "
                "directory)")
    engines = [e for e in a.engines.split(",") if e]
    if set(engines) - set(ENGINES):
        p.error(f"--engines {a.engines}: {sorted(set(engines) - set(ENGINES))} unknown; "
                f"allowed: {', '.join(ENGINES)}")
    results: dict = {"steps": a.steps, "cpus": os.cpu_count(), "repeats": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):  # alternating fresh processes: load changes hit all alike
            rep: dict = {"load_before": os.getloadavg()}
            rep["public"] = public_step_ms(a.public_dir, a.steps)
            for engine in engines:
                rep[engine] = fedmaml_run(engine, a.steps, Path(tmp), f"{engine}-{i}")
            if a.batch:
                rep[f"batch{a.batch}"] = fedmaml_batch(a.batch, a.steps, Path(tmp), f"batch-{i}")
            rep["load_after"] = os.getloadavg()
            results["repeats"].append(rep)
            print(json.dumps(rep), flush=True)
    kinds = [k for k in results["repeats"][0] if not k.startswith("load")]
    results["median"] = {k: {m: statistics.median(r[k][m] for r in results["repeats"])
                             for m in results["repeats"][0][k]} for k in kinds}
    results["ratio_to_public"] = {  # pair by pair, then the median
        k: statistics.median(r[k]["step_ms"] / r["public"]["step_ms"] for r in results["repeats"])
        for k in kinds if k != "public"}
    print(json.dumps({"median": results["median"], "ratio_to_public": results["ratio_to_public"]},
                     indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(with_provenance(results), indent=1) + "\n")


if __name__ == "__main__":
    from fedmaml.cli import run_command  # Ctrl-C: "interrupted", exit 130, no traceback

    raise SystemExit(run_command(main))
