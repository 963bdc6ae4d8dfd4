"""Files a run writes follow the process umask, as files written with ``open()`` do (issue 22):
``tempfile.mkstemp`` alone would leave config.yaml, summary.json and model.pt at 0600, unreadable for
another user of a shared results directory."""

from __future__ import annotations

import importlib.util
import os
import stat
from pathlib import Path

import pytest

from fedmaml.atomic import atomic_write_text, current_umask
from fedmaml.experiment import run_experiment


@pytest.fixture
def umask():
    """``umask(mask)`` sets the process umask for the test; the previous one comes back after it."""
    before = os.umask(0o022)
    os.umask(before)
    yield os.umask
    os.umask(before)


def modes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): stat.S_IMODE(p.stat().st_mode)
            for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_every_file_of_a_run_follows_the_umask(tiny_config, umask, mask):
    umask(mask)
    assert current_umask() == mask
    backends = [b for b in ("tensorboard", "mlflow") if importlib.util.find_spec(b)]
    cfg = tiny_config("federated.checkpoint_every=2", f"tracking.backends=[{','.join(backends)}]")
    run_dir = run_experiment(cfg, quiet=True)
    found = modes(run_dir.parent)  # the trackers' stores too (mlflow.db, mlartifacts/)
    run = run_dir.name
    assert {f"{run}/{n}" for n in ("config.yaml", "summary.json", "model.pt", "metrics.jsonl")} <= set(found)
    assert found == {name: 0o666 & ~mask for name in found}
    assert not [n for n in found if n.endswith(".tmp")]  # no temp file left behind


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "shared.txt"
    atomic_write_text(target, "one")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    target.chmod(0o640)  # the user narrowed it on purpose: a rewrite must not widen it again
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
