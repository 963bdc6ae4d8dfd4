"""What tracking costs per round: ``Tracker.log_round`` on the rows of a real run, per backend
(docs/tracking.md, "Cost").

Usage: ``python simulations/benchmarks/tracking.py RUN_DIR [--rows 500]``. The first training row
(no evaluation) and the last evaluation row of RUN_DIR/metrics.jsonl are each logged ``--rows``
times (with increasing rounds) to a fresh run of every backend that is installed, in a temporary
directory; printed: opening time (the backend's import included when it is the first), median and
mean per row, and the time of ``finish`` (for MLflow: writing the metrics still batched). Report the
load average with the numbers (``uptime``): on a shared machine they are upper bounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from fedmaml.config import load_config
from fedmaml.tracking import BACKENDS, flatten, open_tracker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rows", type=int, default=500)
    args = parser.parse_args()
    rows = [json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = next(r for r in rows if r["round"] > 0 and "eval" not in r)
    evaluation = [r for r in rows if "eval" in r][-1]
    for label, row in (("training row", train), ("evaluation row", evaluation)):
        scalars, histograms = flatten(row)
        print(f"{label}: {len(scalars)} scalars, {len(histograms)} histograms")
    print(f"load average {os.getloadavg()}")
    for backend, (_, _, package, *_) in BACKENDS.items():
        if importlib.util.find_spec(package) is None:
            print(f"{backend}: not installed")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(None, [f"output_dir={tmp}", f"tracking.backends=[{backend}]"])
            start = time.perf_counter()
            tracker = open_tracker(cfg, Path(tmp) / "run")
            opened = time.perf_counter() - start
            timings = {}
            for label, row in (("training row", train), ("evaluation row", evaluation)):
                times = []
                for step in range(1, args.rows + 1):
                    start = time.perf_counter()
                    tracker.log_round(dict(row, round=step))
                    times.append(time.perf_counter() - start)
                timings[label] = (f"median {statistics.median(times) * 1e3:.3f} ms, mean "
                                  f"{statistics.mean(times) * 1e3:.3f} ms")
            start = time.perf_counter()
            tracker.finish({"rounds": args.rows}, Path(tmp) / "run")
            finished = time.perf_counter() - start
        print(f"{backend}: open {opened:.2f} s; "
              + "; ".join(f"{k}: {v}" for k, v in timings.items()) + f"; finish {finished:.2f} s")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    from fedmaml.cli import run_command  # Ctrl-C: "interrupted", exit 130, no traceback

    raise SystemExit(run_command(main))
