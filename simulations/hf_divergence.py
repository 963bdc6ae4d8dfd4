"""How often Per-FedAvg-HF diverges, with the absolute and the normalized finite-difference step.

The Hessian-free estimator (docs/algorithms.md#meta-gradient-estimators) probes ``w +- d v``.
With ``hf_perturbation: absolute`` (Per-FedAvg's form) the probe's length is ``d * ||v||``, so a
large query gradient moves it far from the linear regime; ``normalized`` probes ``w +- d v / ||v||``
(length ``d``) and divides by the same step. This script runs both on the MOML sinewave protocol
(``reproduce_moml_sinewave.py``: centralized, 25 grid tasks, B = 3, K = 1 and 3) over a range of
``eta`` and seeds and counts the runs that diverged (a non-finite or exploded test MSE), writing
``table.md`` and ``results.json``.

    PYTHONPATH=. python simulations/hf_divergence.py                       # defaults below
    PYTHONPATH=. python simulations/hf_divergence.py --steps 200 --seeds 0 --etas 0.01   # smoke

Runs are resumable like the reference script's: a run whose ``summary.json`` exists is reused.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_moml_sinewave import run_all  # noqa: E402  (the reference protocol's runner)
from fedmaml.provenance import with_provenance  # noqa: E402

#: perturbation (and probe length) -> the reference script's method name
VARIANTS = {"absolute, d = 0.001": "Per-FedAvg-HF",
            "normalized, d = 0.001": "Per-FedAvg-HF-normalized",
            "normalized, d = 0.01": "Per-FedAvg-HF-normalized-d0.01",
            # the exact meta-gradient J^T v (Hessian on the support batch, no finite difference)
            "exact second order (MAML)": "MAML-SO"}
#: An untrained model scores about 5.3 on the test tasks; a run ending 10x above that has blown up
#: even if its numbers are still finite.
EXPLODED_MSE = 50.0


def diverged(result: dict[str, Any]) -> bool:
    # A diverged run stops and keeps its last good model: its status says so, not its score.
    return (result.get("status") not in (None, "completed") or not math.isfinite(result["test_mse"])
            or result["test_mse"] > EXPLODED_MSE)


def table(results: list[dict[str, Any]], ks: list[int], etas: list[float]) -> tuple[str, list]:
    rows, lines = [], ["| K | eta | perturbation | diverged seeds | test MSE of the others (median) |",
                       "|---|---|---|---|---|"]
    for k, eta, (kind, method) in itertools.product(ks, etas, VARIANTS.items()):
        mine = [r for r in results if r["K"] == k and r["eta"] == eta and r["method"] == method]
        bad = sorted(r["seed"] for r in mine if diverged(r))
        good = [r["test_mse"] for r in mine if not diverged(r)]
        median = statistics.median(good) if good else math.nan
        rows.append({"K": k, "eta": eta, "perturbation": kind, "seeds": len(mine),
                     "diverged": len(bad), "diverged_seeds": bad, "median_mse": median})
        seeds = f" (seeds {', '.join(map(str, bad))})" if bad else ""
        lines.append(f"| {k} | {eta:g} | {kind} | {len(bad)}/{len(mine)}{seeds} | {median:.3f} |")
    return "\n".join(lines), rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--etas", type=float, nargs="+", default=[0.005, 0.01])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 3])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--output-dir", default="results/hf_divergence")
    a = p.parse_args()
    out = Path(a.output_dir)
    jobs = [(method, k, eta, 1.0, seed, a.steps, str(out / "runs"), 0)
            for k in a.ks for eta in a.etas for method in VARIANTS.values() for seed in a.seeds]
    results = run_all(jobs, a.workers)
    text, rows = table(results, a.ks, a.etas)
    print(f"\nPer-FedAvg-HF after {a.steps} meta-steps:\n{text}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(with_provenance({"args": vars(a), "rows": rows,
                                                                  "runs": results}), indent=1))


if __name__ == "__main__":
    from fedmaml.cli import run_command  # Ctrl-C: "interrupted", exit 130, no traceback

    raise SystemExit(run_command(main))
