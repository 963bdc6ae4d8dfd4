"""Files a run writes follow the process umask, as files written with ``open()`` do (issue 22):
``tempfile.mkstemp`` alone would leave config.yaml, summary.json and model.pt at 0600, unreadable for
another user of a shared results directory."""

from __future__ import annotations

import importlib.util
import os
import stat
from pathlib import Path

import pytest

from fedmaml.atomic import PRIVATE, atomic_write_bytes, atomic_write_text, current_umask
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


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o000])
def test_a_private_write_is_owner_only_whatever_the_umask_or_the_old_mode(tmp_path, umask, mask):
    umask(mask)
    target = tmp_path / "secret"
    atomic_write_bytes(target, b"one", mode=PRIVATE)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    target.chmod(0o644)  # a file left readable (by an older version) is narrowed on rewrite
    atomic_write_bytes(target, b"two", mode=PRIVATE)
    assert target.read_bytes() == b"two" and stat.S_IMODE(target.stat().st_mode) == 0o600
    atomic_write_text(tmp_path / "public", "x")  # the default still follows the umask
    assert stat.S_IMODE((tmp_path / "public").stat().st_mode) == 0o666 & ~mask


def test_client_memories_and_checkpoints_are_owner_only(tiny_config, tmp_path, umask):
    """A device's memory file and a checkpoint (which holds every client's memory) are derived
    from the clients' private data: readable by their owner only, even under umask 0o002."""
    import torch

    from fedmaml.engines.memory_bank import MemoryBank
    from fedmaml.federated import checkpoint
    from fedmaml.federated.memory_store import FileStore

    umask(0o002)
    like = {"w": torch.zeros(3)}
    store = FileStore(tmp_path / "device", 0, like)
    store.save({"w": torch.ones(1, 3)})
    bank = MemoryBank(like, num_clients=2)
    bank.save(tmp_path / "bank.pt")
    checkpoint.save(tmp_path / "run", {"round": 1}, tiny_config())
    for path in (store.path, tmp_path / "bank.pt", checkpoint.path_of(tmp_path / "run")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_memory_bank_on_disk_is_owner_only(tmp_path, umask):
    import torch

    from fedmaml.engines.memory_bank import MemoryBank

    umask(0o002)
    bank = MemoryBank({"w": torch.zeros(3)}, num_clients=4, budget_mb=0.0,
                      directory=tmp_path / "bank")
    bank.write([1], {"w": torch.ones(1, 1, 3)})  # over the budget: memory-mapped files
    assert bank.on_disk
    files = list((tmp_path / "bank").glob("*.bin"))
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
