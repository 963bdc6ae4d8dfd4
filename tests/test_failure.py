"""Failure is failure, on every engine, through the CLI (``python -m fedmaml`` subprocesses):

* a run whose rounds never got a valid reply ends ``failed`` with exit code 1 and says why in its
  summary.json, even with fewer rounds than ``federated.max_failed_rounds``;
* ``engine.device: cuda`` on a machine without a GPU is refused before anything starts, with one
  message naming the key, the value and what is available, on every engine and in vectorized
  sweeps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmaml.config import dump_yaml
from fedmaml.engines import ray_session

REPO = Path(__file__).resolve().parents[1]
ENGINES = ["inprocess", "vectorized",
           pytest.param("ray", marks=[pytest.mark.ray, pytest.mark.slow])]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
NO_GPU = (f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None
          else f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no GPU")
CUDA_REFUSED = (f"error: engine.device: 'cuda' is not available on this machine ({NO_GPU}); "
                "available here: cpu. Use 'cpu', or 'auto' (cuda where present)")


def fedmaml(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m fedmaml ARGS`` with its own state directory (Ray session records)."""
    env = {**os.environ, "PYTHONPATH": str(REPO),
           ray_session.STATE_ENV: str(tmp_path / "state")}
    return subprocess.run([sys.executable, "-m", "fedmaml", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def config_file(tiny_config, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(dump_yaml(tiny_config("federated.eval_every=0")))
    return path


@pytest.mark.parametrize("engine", ENGINES)
def test_a_run_without_one_valid_reply_fails_with_exit_1_whatever_max_failed_rounds(
        engine, config_file, tmp_path):
    done = fedmaml(tmp_path, "run", str(config_file), f"engine.name={engine}", "faults.fail=1.0",
                   "federated.rounds=2", "federated.max_failed_rounds=5",
                   f"output_dir={tmp_path / 'out'}")
    assert done.returncode == 1, done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "tiny" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["message"].startswith("run failed: none of its 2 rounds got a valid reply, so "
                                         "nothing was trained (last error: client error: ")
    assert "injected failure (faults.fail)" in summary["message"]
    assert summary["replies"] == 0 and summary["rounds_completed"] == 2
    assert summary["failures"] == {"error": 6, "timeout": 0, "malformed": 0}  # 3 clients x 2
    assert "FAILED" in done.stdout and "moml did not complete: run failed" in done.stdout


@NO_CUDA
@pytest.mark.parametrize("engine", ["inprocess", "vectorized", "ray"])
def test_cuda_without_a_gpu_is_refused_up_front_the_same_way_by_every_engine(
        engine, config_file, tmp_path):
    done = fedmaml(tmp_path, "run", str(config_file), f"engine.name={engine}",
                   "engine.device=cuda", f"output_dir={tmp_path / 'out'}")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == CUDA_REFUSED
    assert not (tmp_path / "out").exists()  # nothing started: no run directory
    assert not (tmp_path / "state").exists()  # and no Ray session


@NO_CUDA
def test_a_vectorized_sweep_reports_cuda_without_a_gpu_as_every_engine_does(config_file,
                                                                             tmp_path):
    done = fedmaml(tmp_path, "sweep", str(config_file), "--grid", "algorithm.eta=0.005,0.01",
                   "--seeds", "0", "--vectorize", "--sweep-dir", str(tmp_path / "sw"),
                   "engine.name=vectorized", "engine.device=cuda")
    assert done.returncode == 1, done.stderr[-3000:]
    message = CUDA_REFUSED.removeprefix("error: ")
    for run in ("eta=0.005,seed=0", "eta=0.01,seed=0"):
        assert f"failed: {run}: ConfigError: {message}" in done.stderr
        assert not (tmp_path / "sw" / run / "summary.json").exists()


@NO_CUDA
def test_ray_gpus_per_client_without_a_gpu_are_refused_up_front(config_file, tmp_path):
    # Flower would start Ray, find room for no actor ("ActorPool is empty") and hang (measured)
    done = fedmaml(tmp_path, "run", str(config_file), "engine.name=ray", "engine.num_gpus=0.5",
                   f"output_dir={tmp_path / 'out'}")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "error: engine.num_gpus: 0.5 gives each client a share of a GPU, but there is none on this "
        f"machine ({NO_GPU}); available here: 0 GPUs. Use "
        "engine.num_gpus: 0, or engine.ray_address of a Ray cluster with GPUs")
    assert not (tmp_path / "out").exists() and not (tmp_path / "state").exists()
