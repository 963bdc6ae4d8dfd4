"""A short documented run whose numbers this commit reproduces bit for bit (docs/results.md,
"Reproducing a documented run"; checked by tests/test_packaging.py).

Runs ``fedmaml run sinewave_centralized federated.rounds=400 federated.eval_every=200`` (the MOML
sinewave reference config, 400 steps: a few seconds) in a temporary directory and writes what must
not change: the before/after evaluation numbers of summary.json without the timings (``*-ms``,
measured wall time), a SHA-256 of the final model's parameters, and where the numbers came from.

    PYTHONPATH=. python simulations/reproduce_short_run.py                  # print the record
    PYTHONPATH=. python simulations/reproduce_short_run.py --out docs/results/short_run.json

Rewrite docs/results/short_run.json (and the table in docs/results.md) after a change that is meant
to change the numbers, from a clean tree, and commit it with that change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ARGS = ("sinewave_centralized", "federated.rounds=400", "federated.eval_every=200")
COMMAND = "fedmaml run " + " ".join(ARGS)


def deterministic(metrics: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's numbers without the timings (adaptation milliseconds), which vary."""
    return {k: v for k, v in metrics.items() if "-ms." not in k}


def model_digest(path: Path) -> str:
    """SHA-256 of the parameters' bytes, in name order (the file's own bytes hold pickle framing
    that can change with torch without a parameter changing)."""
    import torch

    params = torch.load(path, map_location="cpu", weights_only=True)
    digest = hashlib.sha256()
    for name in sorted(params):
        digest.update(name.encode())
        digest.update(params[name].detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cpu_capability() -> str:
    """The vector instruction set torch's CPU kernels use: results are bitwise equal only on the
    same capability (and torch build)."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def record_of(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return {"command": COMMAND, "status": summary["status"], "metric": summary["metric"],
            "before": deterministic(summary["before"]), "after": deterministic(summary["after"]),
            "model_sha256": model_digest(run_dir / "model.pt"),
            "platform": {"machine": platform.machine(), "cpu_capability": cpu_capability()},
            # the code that ran (the run's own record), not this script's
            "provenance": summary["provenance"]}


def run(work_dir: Path) -> dict[str, Any]:
    """Run the command as a user would (``python -m fedmaml``) in ``work_dir``, with this
    checkout's fedmaml first on the path; its record."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    subprocess.run([sys.executable, "-m", "fedmaml", "run", *ARGS, "--quiet"], cwd=work_dir,
                   check=True, env={**os.environ, "PYTHONPATH": path})
    return record_of(work_dir / "results" / "sinewave_centralized")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the record here (default: print it)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        record = run(Path(tmp))
    text = json.dumps(record, indent=1) + "\n"
    if a.out:
        a.out.write_text(text, encoding="utf-8")
        print(f"written to {a.out}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    from fedmaml.cli import run_command  # Ctrl-C: "interrupted", exit 130, no traceback

    raise SystemExit(run_command(main))
