"""Centralized sinewave: MOML vs FO-MAML on the MOML paper's 25-task grid
(docs/algorithms.md#reference-protocol-moml-sinewave).

Centralized meta-learning is the federated engine's special case (H = 1, server_lr = 1, uniform
averaging, one task per client, B = 3 clients per round), so this script only changes config keys
of ``configs/sinewave_centralized.yaml``. Both methods use the public code's K = 1 step sizes
(FO-MAML eta 0.001; MOML eta 0.005 and beta 0.3 with the meta-gradient scaled by beta) and the
same seeds; the test MSE is measured on 5 unseen tasks after 10 adaptation steps on 10 points.

    python simulations/sinewave_centralized.py --rounds 4000 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from fedmaml.config import load_config
from fedmaml.experiment import run_experiment
from fedmaml.results.recorder import read_summary

METHODS = {
    "MOML": ["algorithm.name=moml", "algorithm.eta=0.005", "algorithm.beta=0.3",
             "algorithm.scale_by_beta=true"],
    "FO-MAML": ["algorithm.name=fedmeta", "algorithm.meta_gradient=first_order",
                "algorithm.eta=0.001", "algorithm.scale_by_beta=false"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).parent.parent / "configs"
                                                 / "sinewave_centralized.yaml"))
    parser.add_argument("--rounds", type=int, default=4000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output-dir", default="results/sinewave_centralized")
    args = parser.parse_args()

    table: dict[str, list[float]] = {}
    for method, overrides in METHODS.items():
        for seed in args.seeds:
            cfg = load_config(args.config, [*overrides, f"seed={seed}",
                                            f"federated.rounds={args.rounds}",
                                            f"federated.eval_every={max(1, args.rounds // 4)}",
                                            f"name={method}-seed{seed}",
                                            f"output_dir={args.output_dir}"])
            run_dir = run_experiment(cfg, quiet=True, run_dir=Path(args.output_dir) / cfg.name)
            mse = read_summary(run_dir)["after"]["unseen.loss.mean"]
            table.setdefault(method, []).append(mse)
            print(f"{method:8s} seed {seed}: test MSE {mse:.4f}  ({run_dir})", flush=True)
    print(f"\nTest MSE on unseen tasks after {args.rounds} steps (mean +- std over seeds {args.seeds}):")
    for method, values in table.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"  {method:8s} {statistics.mean(values):.4f} +- {std:.4f}")


if __name__ == "__main__":
    from fedmaml.cli import run_command  # Ctrl-C: "interrupted", exit 130, no traceback

    raise SystemExit(run_command(main))
