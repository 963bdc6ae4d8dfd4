"""Fixtures shared by the test modules. Keep this file small: one documented fixture per need."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fedmaml.config import Config, load_config

#: A federation that runs in about a second in-process: sinusoid tasks, 6 training and 2 unseen
#: clients, an MLP with one hidden layer (two layer groups, so patterns such as ``11|01`` are
#: meaningful), 3 clients per round, 3 rounds, evaluation at rounds 0, 2 and 3 on every client.
TINY = ("name=tiny", "data.family=sinusoid", "data.num_clients=6", "data.unseen_clients=2",
        "data.eval_adapt_size=5", "data.eval_heldout_size=20", "model.hidden=[16]",
        "algorithm.support_size=4", "federated.rounds=3", "federated.clients_per_round=3",
        "federated.eval_every=2", "federated.eval_clients=0", "evaluation.steps=2")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``deployment`` run first, in their usual order (the sort is stable).

    They take minutes of wall time but little CPU: they mostly wait on SuperLinks, SuperNodes and
    round timeouts. Under ``make test`` (pytest-xdist, ``-n 2``) the first worker takes them in its
    first batch while the other runs the CPU-bound tests; started last, they would run alone at the
    end of the suite. Their fixtures are function-scoped (apart from helpers.single_thread, which
    costs nothing to set up again), and run one at a time the order changes nothing."""
    items.sort(key=lambda item: item.get_closest_marker("deployment") is None)


@pytest.fixture
def tiny_config(tmp_path: Path):
    """``tiny_config(*overrides) -> Config``: :data:`TINY` plus ``key=value`` overrides, with
    ``output_dir`` under the test's temporary directory."""

    def make(*overrides: str) -> Config:
        return load_config(None, [*TINY, f"output_dir={tmp_path / 'runs'}", *overrides])

    return make


def own_raylets() -> list[int]:
    """PIDs of raylet processes of a Ray session started by this process (Ray names the session
    directory ``session_<date>_<pid of the process that started it>``), whoever else uses Ray here."""
    marker = f"_{os.getpid()}/"
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended while we looked
            continue
        if "raylet" in cmd.split(" ", 1)[0] and marker in cmd:
            pids.append(int(proc.name))
    return pids


@pytest.fixture
def ray_guard():
    """For tests that start Ray: shuts Ray down afterwards even if the test failed, then fails the
    test if a raylet this process started is still alive 15 s later (a leaked cluster)."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
    deadline = time.monotonic() + 15
    while own_raylets() and time.monotonic() < deadline:
        time.sleep(0.2)
    leaked = own_raylets()
    assert not leaked, f"Ray processes left running: raylet pids {leaked}"
