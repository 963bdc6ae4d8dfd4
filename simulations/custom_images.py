"""Your own model and images from zero to a figure (docs/custom.md, "From your images to a figure").

A user's small CNN with residual blocks (``my_models.py``, the module of docs/custom.md's runnable
example; fedmaml has no such model built in) on images the user has as arrays: scikit-learn's 8x8
digits stand in for them. Each client's images are written as one file, ``clients/<id>.npz`` with
``x`` ``[n, 1, 8, 8]`` float32 and ``y`` ``[n]`` integer labels; each client holds three of the
ten digits and calls them 0, 1, 2 in its own order, so a model adapted to a client beats one shared
model. A sweep with named settings then compares MOML adapting only the CNN's head (Lambda pattern
``0001``), MOML adapting every layer, and FedAvg, on the same clients and seeds, and ``fedmaml
compare`` draws the figure and the table.
Everything goes to ``--out`` (default ``results/custom_images``).

    PYTHONPATH=. python simulations/custom_images.py            # 400 rounds x 2 seeds
    PYTHONPATH=. python simulations/custom_images.py --short    # 6 rounds x 1 seed (CI)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

# The user's module: the same text as docs/custom.md's my_models.py (tests/test_user_guide.py
# checks that the two agree).
MY_MODELS = '''\
import torch
from torch import nn


class Residual(nn.Module):
    """x + BN(conv(x)), then ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


def small_resnet(input_shape, num_outputs, width: int = 16) -> nn.Module:
    """fedmaml passes input_shape and num_outputs (from the data) because the signature asks for
    them; width comes from model.kwargs."""
    return nn.Sequential(
        nn.Conv2d(input_shape[0], width, 3, padding=1), nn.ReLU(),  # group "0"
        Residual(width),                                            # group "2"
        nn.MaxPool2d(2),
        Residual(width),                                            # group "4"
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(width, num_outputs),                              # group "7"
    )
'''

CLIENTS, DIGITS_PER_CLIENT = 24, 3


def write_client_files(images: np.ndarray, digits: np.ndarray, directory: Path,
                       clients: int = CLIENTS, seed: int = 0) -> None:
    """Write ``images`` (``[N, H, W]``, any numeric type) of the given ``digits`` as one
    ``<id>.npz`` per client: ``x`` ``[n, 1, H, W]`` float32 in [0, 1], ``y`` ``[n]`` int64.

    Client c holds the digits c, c+1, c+2 (mod 10), a share of each one's images, and labels them
    0, 1, 2 in an order of its own (as users who name their own classes do): one shared model
    cannot fit every client, a model adapted to a client's few labelled examples can."""
    rng = np.random.default_rng(seed)
    x = (images / images.max()).astype(np.float32)[:, None]  # a channel axis: [N, 1, H, W]
    owners: dict[int, list[int]] = {c: [] for c in range(clients)}
    for digit in range(10):
        holders = [c for c in range(clients)
                   if (digit - c) % 10 < DIGITS_PER_CLIENT]  # the clients holding this digit
        for k, chunk in enumerate(np.array_split(rng.permutation(np.flatnonzero(digits == digit)),
                                                 len(holders))):
            owners[holders[k]].extend(chunk.tolist())
    directory.mkdir(parents=True, exist_ok=True)
    for client, rows in owners.items():
        rows = np.array(sorted(rows))
        order = rng.permutation(DIGITS_PER_CLIENT)  # the client's label of digit c + k: order[k]
        labels = order[(digits[rows] - client) % 10].astype(np.int64)
        np.savez(directory / f"{client}.npz", x=x[rows], y=labels)


CONFIG = """\
name: custom_images
seed: 0
data:
  family: files
  path: {clients}
  partition: natural          # the clients as written, one per file
  num_clients: 20
  unseen_clients: 4
  heldout_fraction: 0.3
  eval_adapt_size: 10
model:
  name: my_models:small_resnet
  kwargs: {{width: 16}}
algorithm: {{name: moml, support_size: 10, alpha: 0.5, eta: 0.05, beta: 0.5}}
federated: {{rounds: {rounds}, clients_per_round: 5, eval_every: {every}}}
evaluation: {{steps: 1, alpha: 0.5, pattern: "0001"}}   # every method adapts its head (1 step)
sweep:
  settings:
    MOML-head: {{algorithm.inner_pattern: "0001"}}       # adapt only the head while training
    MOML-full: {{algorithm.inner_pattern: full}}
    FedAvg: {{algorithm.name: fedavg, algorithm.eta: 0.1}}
  seeds: {seeds}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/custom_images", help="output directory")
    parser.add_argument("--short", action="store_true", help="6 rounds, one seed (a smoke test)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (fedmaml sweep --jobs)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    rounds, seeds = (6, "[0]") if args.short else (400, "[0, 1]")

    from sklearn.datasets import load_digits  # the user's images: any [N, H, W] array will do

    digits = load_digits()
    write_client_files(digits.images, digits.target, out / "clients")
    (out / "my_models.py").write_text(MY_MODELS, encoding="utf-8")
    config = out / "images.yaml"
    config.write_text(CONFIG.format(clients=out / "clients", rounds=rounds,
                                    every=max(rounds // 10, 1), seeds=seeds), encoding="utf-8")
    # Every process of the sweep imports my_models by its path: put its directory on PYTHONPATH.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(out), os.environ.get("PYTHONPATH")])))
    fedmaml = [sys.executable, "-m", "fedmaml"]
    subprocess.run(fedmaml + ["sweep", str(config), "--quiet", "--jobs", str(args.jobs),
                              "--sweep-dir", str(out / "sweep")], check=True, env=env)
    subprocess.run(fedmaml + ["compare", str(out / "sweep"), "--out", str(out / "compare")],
                   check=True, env=env)
    print(f"figures and report: {out / 'compare'}")
    return 0


if __name__ == "__main__":
    from fedmaml.cli import run_command  # Ctrl-C: "interrupted", exit 130, no traceback

    raise SystemExit(run_command(main))
