"""Device-side memories (``FileStore``, node config): what survives a restart, a kill, a bad file.

* A memory on disk is the same memory after a restart: a federation whose nodes all restart between
  every message (fresh Context, fresh store objects) records exactly the metrics of one that keeps
  its memories in RAM.
* SIGKILL in the middle of a write never leaves a corrupt file: a forked writer is killed at random
  moments while saving in a loop; the file always loads and holds one complete version.
* A corrupt, foreign or mismatched file is an error naming the file and the fix, and is left as it
  is; with ``memory-reset`` it is moved aside (never deleted) and the client starts afresh.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from fedmaml.engines.inprocess import InProcessGrid, run_inprocess
from fedmaml.errors import ConfigError, DataError
from fedmaml.federated import node_config
from fedmaml.federated.client_app import make_client_app
from fedmaml.federated.memory_store import ContextStateStore, FileStore, digest
from fedmaml.federated.server_app import make_server_app
from fedmaml.results.recorder import read_metrics

LIKE = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}


def memory(value: float, tasks: int = 2) -> dict[str, torch.Tensor]:
    return {k: torch.full((tasks, *v.shape), value) for k, v in LIKE.items()}


def context(node: dict, run_id: int = 7) -> Context:
    return Context(run_id=run_id, node_id=1, node_config=node, state=RecordDict(), run_config={})


# -- ContextStateStore ------------------------------------------------------------------------------

def test_context_state_holds_flowers_bytes_and_a_load_sees_every_change():
    from fedmaml.federated import codec
    from fedmaml.federated.memory_store import MEMORY_KEY

    ctx = context({})
    assert ContextStateStore(ctx).load() is None
    ContextStateStore(ctx).save(memory(1.5))
    record = ctx.state.array_records[MEMORY_KEY]  # what Flower keeps: its own ArrayRecord format
    assert all(torch.equal(torch.from_numpy(record[k].numpy().copy()), v)
               for k, v in memory(1.5).items())
    loaded = ContextStateStore(ctx).load()  # a new store, as for every message: same values
    assert all(torch.equal(loaded[k], v) for k, v in memory(1.5).items())
    # the state changed behind the store's back: a new record, then one array of it replaced
    ctx.state[MEMORY_KEY] = codec.encode(memory(2.0))
    assert all(torch.equal(ContextStateStore(ctx).load()[k], v) for k, v in memory(2.0).items())
    ContextStateStore(ctx).save(memory(3.0))
    name = next(iter(LIKE))
    ctx.state.array_records[MEMORY_KEY][name] = codec.encode({name: memory(4.0)[name]})[name]
    got = ContextStateStore(ctx).load()
    assert torch.equal(got[name], memory(4.0)[name])
    assert all(torch.equal(got[k], memory(3.0)[k]) for k in LIKE if k != name)


# -- FileStore --------------------------------------------------------------------------------------

def test_save_then_load_in_a_new_store_gives_the_same_values(tmp_path):
    lines = []
    FileStore(tmp_path, 3, LIKE).save(memory(1.5))
    assert FileStore(tmp_path, 4, LIKE).load() is None  # another client has none yet
    loaded = FileStore(tmp_path, 3, LIKE, report=lines.append).load()
    assert all(torch.equal(loaded[k], v) for k, v in memory(1.5).items()) and list(loaded) == list(LIKE)
    data = (tmp_path / "memory-3.pt").read_bytes()
    assert lines == [f"client 3: memory loaded {tmp_path / 'memory-3.pt'} (2 tasks, sha256 "
                     f"{digest(data)})"]


@pytest.mark.parametrize("damage, expected", [
    (lambda b: b[: len(b) // 2], "unreadable"),  # a torn write, as without the atomic rename
    (lambda b: b"not a torch file at all", "unreadable"),
])
def test_a_corrupt_file_is_an_error_and_is_left_as_it_is(tmp_path, damage, expected):
    store = FileStore(tmp_path, 0, LIKE)
    store.save(memory(1.0))
    bad = damage(store.path.read_bytes())
    store.path.write_bytes(bad)
    with pytest.raises(DataError) as e:
        store.load()
    message = str(e.value)
    assert str(store.path) in message and expected in message
    assert "memory-reset=true" in message and "move the file away" in message
    assert store.path.read_bytes() == bad  # never silently replaced
    assert list(tmp_path.iterdir()) == [store.path]


@pytest.mark.parametrize("stored, expected", [
    ({"w": torch.zeros(2, 3, 3), "b": torch.zeros(2, 2)}, "'w' has per-task shape [3, 3], "
                                                          "expected [3, 2]"),
    ({"w": torch.zeros(2, 3, 2)}, "has parameters ['w'], expected ['w', 'b']"),
    ({"w": torch.zeros(2, 3, 2), "b": torch.zeros(3, 2)}, "disagree on the number of tasks"),
    ([1, 2, 3], "does not hold a memory"),
])
def test_a_memory_of_the_wrong_shape_is_an_error(tmp_path, stored, expected):
    path = tmp_path / "memory-0.pt"
    torch.save(stored, path)
    with pytest.raises(DataError, match="memory file") as e:
        FileStore(tmp_path, 0, LIKE).load()
    assert expected in str(e.value) and str(path) in str(e.value)
    assert path.exists()


def test_reset_moves_a_bad_file_aside_and_starts_fresh(tmp_path):
    path = tmp_path / "memory-0.pt"
    path.write_bytes(b"garbage")
    lines = []
    assert FileStore(tmp_path, 0, LIKE, reset_corrupt=True, report=lines.append).load() is None
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("memory-0.pt.corrupt-")]
    assert not path.exists() and len(aside) == 1 and aside[0].read_bytes() == b"garbage"
    assert "moved to memory-0.pt.corrupt-" in lines[0] and "memory-reset=true" in lines[0]
    FileStore(tmp_path, 0, LIKE, reset_corrupt=True).save(memory(2.0))  # the fresh one is saved
    assert FileStore(tmp_path, 0, LIKE).load()["b"].eq(2.0).all()


PAYLOAD = {"w": torch.full((4, 256, 256), 7.0)}  # 1 MiB, so that a save takes a few ms


def _write_forever(directory: str) -> None:
    """Save versions 1, 2, 3... until killed. Runs in a forked child: no tensor computation here
    (an intra-op thread pool inherited through fork can hang), only tiny tensors and saving."""
    store = FileStore(directory, 0)
    version = 0
    while True:
        version += 1
        store.save({"version": torch.tensor([float(version)] * 4), **PAYLOAD})  # 4 "tasks"


def _kill_mid_write(directory: Path, writer, deadline: float) -> None:
    """SIGKILL ``writer`` as soon as one of its temp files exists: between the temp file's creation
    and its rename, i.e. in the middle of a save."""
    while time.monotonic() < deadline:
        if any(p.name.endswith(".tmp") for p in directory.iterdir()):
            break
    os.kill(writer.pid, signal.SIGKILL)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_during_writes_never_leaves_a_corrupt_file(tmp_path):
    fork = multiprocessing.get_context("fork")  # the child inherits torch: no re-import per kill
    rng = random.Random(0)
    versions, hits, i = [], 0, 0
    # 16 kills, half of them waiting for a write in progress; on a loaded machine a write may end
    # between seeing its temp file and the kill, so waiting kills go on until 8 landed mid-write
    while i < 16 or (hits < 8 and i < 64):
        waiting = i % 2 == 0
        writer = fork.Process(target=_write_forever, args=(str(tmp_path),), daemon=True)
        writer.start()
        try:
            time.sleep(0.03 + 0.07 * rng.random())
            if waiting:
                _kill_mid_write(tmp_path, writer, time.monotonic() + 10)
        finally:
            if writer.is_alive():
                os.kill(writer.pid, signal.SIGKILL)
            writer.join(10)
        temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        hits += waiting and bool(temps)  # the kill landed in the middle of a write
        for p in temps:
            p.unlink()
        i += 1
        loaded = FileStore(tmp_path, 0).load()
        if loaded is None:  # killed before its first save completed
            continue
        assert torch.equal(loaded["w"], PAYLOAD["w"]) and loaded["version"].unique().numel() == 1
        versions.append(int(loaded["version"][0]))  # one complete version, never a mix
    assert versions and hits >= 8  # versions were written, and 8 kills hit a write in progress


# -- node config ------------------------------------------------------------------------------------

def test_node_config_picks_the_store_and_keeps_memories_per_run(tmp_path):
    assert isinstance(node_config.memory_store(context({}), 0, LIKE), ContextStateStore)
    store = node_config.memory_store(context({"memory-dir": str(tmp_path)}, run_id=7), 2, LIKE)
    assert isinstance(store, FileStore) and store.path == tmp_path / "run-7" / "memory-2.pt"
    assert not store.reset_corrupt
    store.save(memory(1.0))
    other_run = node_config.memory_store(context({"memory-dir": str(tmp_path)}, run_id=8), 2, LIKE)
    assert other_run.load() is None  # a new run starts from fresh memories
    reset = node_config.memory_store(context({"memory-dir": str(tmp_path), "memory-reset": "true"}),
                                     2, LIKE)
    assert reset.reset_corrupt


def test_node_data_path_replaces_data_path_for_that_node_only(tiny_config, tmp_path):
    cfg = tiny_config()
    assert node_config.with_node_data(cfg, context({})) is cfg
    mine = node_config.with_node_data(cfg, context({"data-path": str(tmp_path)}))
    assert mine.data.path == str(tmp_path) and cfg.data.path == ""
    assert mine.algorithm == cfg.algorithm


@pytest.mark.parametrize("value", [None, "x", -1, True])
def test_a_bad_partition_id_names_the_key(value):
    node = {} if value is None else {"partition-id": value}
    with pytest.raises(ConfigError, match="partition-id .* integer >= 0"):
        node_config.client_id(context(node))


# -- through the real apps: restarts do not change a run --------------------------------------------

class RestartingDevices(InProcessGrid):
    """In-process nodes with memories on disk that all restart after every exchange: each message
    finds a fresh Context, as a SuperNode process that was killed and started again would."""

    def __init__(self, client_app, num_nodes, memory_root: Path | None) -> None:
        super().__init__(client_app, num_nodes)
        self.memory_root = memory_root  # None: memories in RAM (Context.state), lost on restart

    def context(self, node_id):
        ctx = super().context(node_id)
        if self.memory_root is not None:
            ctx.node_config["memory-dir"] = str(self.memory_root / f"node-{node_id}")
        return ctx

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        self.contexts.clear()  # every node restarts
        return replies


def _rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    rows = read_metrics(run_dir)
    for row in rows:
        for key in ("seconds", "train_seconds_max"):
            row.pop(key, None)
        for k in [k for k in row.get("eval", {}) if "adapt-ms" in k]:
            row["eval"].pop(k)
    return rows


def test_nodes_restarting_with_memories_on_disk_give_the_same_run(tiny_config, tmp_path):
    cfg = tiny_config("federated.rounds=4", "federated.eval_every=2")
    n = cfg.data.num_clients + cfg.data.unseen_clients
    ram, disk = tmp_path / "ram", tmp_path / "disk"
    run_inprocess(make_server_app(cfg, ram, quiet=True), make_client_app(cfg), n)
    app = make_client_app(cfg)
    grid = RestartingDevices(app, n, tmp_path / "memories")
    run_inprocess(make_server_app(cfg, disk, quiet=True), app, n, grid=grid)
    assert _rows(disk) == _rows(ram)
    # The control: the same restarts with memories in RAM lose them, and the run changes.
    lost = tmp_path / "lost"
    app = make_client_app(cfg)
    run_inprocess(make_server_app(cfg, lost, quiet=True), app, n,
                  grid=RestartingDevices(app, n, None))
    assert _rows(lost) != _rows(ram)
    files = sorted(p.relative_to(tmp_path / "memories").as_posix()
                   for p in (tmp_path / "memories").rglob("memory-*.pt"))
    assert files and all(f.startswith("node-") and "/run-1/memory-" in f for f in files)


# -- a reset is reported: reply -> metrics.jsonl -> summary.json -> the printed table ------------

class CorruptingDevices(InProcessGrid):
    """In-process nodes with memories on disk and ``memory-reset=true``; just before the messages
    of a ``(message type, round)`` in ``at`` are delivered, every memory file of the clients they
    go to is overwritten with garbage, as a failing disk or a foreign write would."""

    def __init__(self, client_app, num_nodes, memory_root: Path, at: set) -> None:
        super().__init__(client_app, num_nodes)
        self.memory_root, self.at = memory_root, at
        self.corrupted: dict[tuple[str, int], list[int]] = {}

    def context(self, node_id):
        ctx = super().context(node_id)
        ctx.node_config.update({"memory-dir": str(self.memory_root / f"node-{node_id}"),
                                "memory-reset": "true"})
        return ctx

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for msg in messages:
            when = (msg.metadata.message_type, int(msg.content["config"]["server-round"]))
            if when in self.at:
                cid = msg.metadata.dst_node_id - 2
                for path in (self.memory_root / f"node-{msg.metadata.dst_node_id}").rglob(
                        f"memory-{cid}.pt"):
                    path.write_bytes(b"not a memory")
                    self.corrupted.setdefault(when, []).append(cid)
        return super().send_and_receive(messages, timeout=timeout)


def test_a_completed_run_reports_the_client_memories_it_reset(tiny_config, tmp_path):
    """Files corrupted before round 2's training and before round 3's evaluation: each reset is
    counted in its round, in the summary (with the client ids) and in the printed table."""
    from fedmaml.experiment import format_summary
    from fedmaml.results.recorder import read_summary

    cfg = tiny_config("federated.rounds=3", "federated.eval_every=3")
    n = cfg.data.num_clients + cfg.data.unseen_clients
    app = make_client_app(cfg)
    grid = CorruptingDevices(app, n, tmp_path / "memories", at={("train", 2), ("evaluate", 3)})
    run_dir = tmp_path / "run"
    run_inprocess(make_server_app(cfg, run_dir, quiet=True), app, n, grid=grid)
    trained, evaluated = grid.corrupted.get(("train", 2)), grid.corrupted.get(("evaluate", 3))
    assert trained and evaluated, f"nothing to corrupt: {grid.corrupted}"
    rows = {row["round"]: row for row in read_metrics(run_dir)}
    assert (rows[2]["memory_resets"], rows[2]["memory_reset_clients"]) == (len(trained),
                                                                           sorted(trained))
    assert (rows[3]["memory_resets"], rows[3]["memory_reset_clients"]) == (len(evaluated),
                                                                           sorted(evaluated))
    assert "memory_resets" not in rows[0] and "memory_resets" not in rows[1]
    summary = read_summary(run_dir)
    every = sorted(set(trained) | set(evaluated))
    assert summary["status"] == "completed"
    assert summary["memory_resets"] == len(trained) + len(evaluated)
    assert summary["memory_reset_clients"] == every
    # the bad files were moved aside, not deleted
    assert (len(list((tmp_path / "memories").rglob("memory-*.pt.corrupt-*")))
            == len(trained) + len(evaluated))
    assert (f"completed, {len(trained) + len(evaluated)} client memories reset (clients "
            f"{', '.join(map(str, every))}:" in format_summary([run_dir]))
