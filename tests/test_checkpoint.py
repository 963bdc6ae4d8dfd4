"""Checkpoints and exact resume: a run interrupted after a random round and resumed ends bitwise
identical (model, every client memory, metrics.jsonl apart from timing) to a run that never
stopped, on every engine; SIGTERM really stops a run with a checkpoint; reruns and sweeps find
unfinished runs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message

from fedmaml.config import dump_yaml
from fedmaml.engines.inprocess import FIRST_CLIENT_NODE, run_inprocess
from fedmaml.engines.vectorized import run_vectorized
from fedmaml.experiment import run_experiment
from fedmaml.federated import checkpoint, faults
from fedmaml.federated import records as R
from fedmaml.federated.client_app import make_client_app
from fedmaml.federated.memory_store import ContextStateStore
from fedmaml.federated.server_app import make_server_app
from fedmaml.federated.setup import setup_for
from fedmaml.results.recorder import read_metrics, read_summary

REPO = Path(__file__).resolve().parents[1]
TIMING = ("seconds", "train_seconds_max")
ROUNDS = 6
# MOML with memories, Adam on the server (optimizer state), faults (their draws must continue
# exactly), evaluation from memory every 2 rounds on every client.
RESUMABLE = ("algorithm.name=moml", f"federated.rounds={ROUNDS}", "federated.eval_every=2",
             "federated.server_optimizer=adam", "federated.server_lr=0.01",
             "federated.round_timeout=60", "faults.fail=0.2", "faults.straggle=0.1")


def without_timing(row: dict) -> dict:
    """A row (or summary) without wall-clock fields: the round's seconds, the slowest client's
    training seconds, and the evaluation's adaptation milliseconds."""
    out = {k: v for k, v in row.items() if k not in TIMING}
    for k in ("eval", "before", "after"):
        if k in out:
            out[k] = {m: v for m, v in out[k].items() if ".adapt-ms." not in m}
    return out


@pytest.fixture
def stop_after(monkeypatch):
    """``stop_after(k)``: the next run is asked to stop at the end of round ``k``, as a SIGINT
    arriving during that round would (the run checks for a stop request once per round, on every
    engine; the real signal path is tested with a subprocess below)."""

    def arm(k: int) -> None:
        rounds = iter(range(10 ** 6))
        monkeypatch.setattr(checkpoint, "stop_requested", lambda: next(rounds) >= k)

    yield arm
    monkeypatch.undo()


def run_on(engine: str, cfg, run_dir: Path, resume: bool = False):
    """Run on the in-process or vectorized engine; return the memories the clients hold at the end."""
    setup = setup_for(cfg)
    num_nodes = setup.federation.num_clients + setup.federation.num_unseen
    server = make_server_app(cfg, run_dir, quiet=True, resume=resume)
    app = make_client_app(cfg)
    with checkpoint.stop_on_signals():
        if engine == "inprocess":
            grid = run_inprocess(server, app, num_nodes)
            return {c - FIRST_CLIENT_NODE: ContextStateStore(ctx).load()
                    for c, ctx in grid.contexts.items() if ContextStateStore(ctx).load() is not None}
        grid = run_vectorized(server, app, num_nodes, cfg)
        try:
            ids = grid.bank.client_ids().tolist()
            stacked = grid.bank.read(ids)
            return {c: {k: v[j] for k, v in stacked.items()} for j, c in enumerate(ids)}
        finally:
            grid.close()


def assert_same_run(a: Path, b: Path, memories_a=None, memories_b=None) -> None:
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["round"] for r in rb] == list(range(ROUNDS + 1))
    assert [without_timing(r) for r in ra] == [without_timing(r) for r in rb]
    ma, mb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    sa, sb = read_summary(a), read_summary(b)
    assert sb["status"] == "completed"
    assert without_timing(sa) == without_timing(sb)
    if memories_a is not None:
        assert memories_a.keys() == memories_b.keys() and memories_a
        for c in memories_a:
            for k in memories_a[c]:
                assert torch.equal(memories_a[c][k], memories_b[c][k]), (c, k)
    assert not checkpoint.path_of(b).exists()  # a run that ended keeps no checkpoint


@pytest.mark.parametrize("engine", ["inprocess", "vectorized"])
def test_an_interrupted_run_resumes_bitwise_identical(engine, tiny_config, tmp_path, stop_after,
                                                       monkeypatch):
    interrupt_and_resume(engine, tiny_config(*RESUMABLE, f"engine.name={engine}"), tmp_path,
                         stop_after, monkeypatch)


@pytest.mark.parametrize("extra", [
    ("participation.model=markov",),  # staleness bookkeeping and the availability chains
    ("privacy.clipping=server", "federated.aggregation=uniform",  # the privacy account
     "privacy.noise_multiplier=0.5"),
], ids=["participation", "privacy"])
def test_participation_and_privacy_state_resume_bitwise_identical(extra, tiny_config, tmp_path,
                                                                   stop_after, monkeypatch):
    interrupt_and_resume("inprocess", tiny_config(*RESUMABLE, *extra), tmp_path, stop_after,
                         monkeypatch)


def interrupt_and_resume(engine, cfg, tmp_path, stop_after, monkeypatch):
    stop_at = random.randint(1, ROUNDS - 1)
    full = run_on(engine, cfg, tmp_path / "full")
    stop_after(stop_at)
    cut = run_on(engine, cfg, tmp_path / "cut")
    monkeypatch.undo()
    summary = read_summary(tmp_path / "cut")
    assert summary["status"] == "interrupted", stop_at
    assert summary["message"] == (f"interrupted after round {stop_at}; resume with `fedmaml run "
                                  f"--resume {tmp_path / 'cut'}`")
    assert checkpoint.load(tmp_path / "cut")["round"] == stop_at
    assert cut.keys() <= full.keys()
    # a kill after the checkpoint may leave rows of a later round: the resume drops them
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"round": stop_at + 1, "partial": True}) + "\n")
    resumed = run_on(engine, cfg, tmp_path / "cut", resume=True)
    assert_same_run(tmp_path / "full", tmp_path / "cut", full, resumed)


def test_periodic_checkpoints_survive_a_kill(tiny_config, tmp_path):
    # checkpoint_every=2, killed (SIGKILL: no chance to write anything) during round 5: the
    # checkpoint of round 4 is there, and the resume from it ends as the uninterrupted run.
    cfg = tiny_config(*RESUMABLE, "federated.checkpoint_every=2")
    run_on("inprocess", cfg, tmp_path / "full")
    assert not checkpoint.path_of(tmp_path / "full").exists()
    config = tmp_path / "c.yaml"
    config.write_text(dump_yaml(cfg))
    script = ("import sys, os, signal\n"
              "from fedmaml.config import load_config\n"
              "from fedmaml.federated import health\n"
              "from fedmaml.experiment import run_experiment\n"
              "observe = health.RunHealth.observe\n"
              "def kill_in_5(self, row, last_error=''):\n"
              "    observe(self, row, last_error)\n"
              "    if row['round'] == 5: os.kill(os.getpid(), signal.SIGKILL)\n"
              "health.RunHealth.observe = kill_in_5\n"
              f"run_experiment(load_config({str(config)!r}), quiet=True, run_dir={str(tmp_path / 'cut')!r})\n")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert read_summary(tmp_path / "cut") is None
    assert [r["round"] for r in read_metrics(tmp_path / "cut")] == [0, 1, 2, 3, 4, 5]
    assert checkpoint.load(tmp_path / "cut")["round"] == 4
    run_on("inprocess", cfg, tmp_path / "cut", resume=True)
    assert_same_run(tmp_path / "full", tmp_path / "cut")


@pytest.mark.parametrize("first,second", [("vectorized", "inprocess"), ("inprocess", "vectorized")])
def test_a_checkpoint_of_one_engine_resumes_on_another(tiny_config, tmp_path, stop_after, first,
                                                       second, monkeypatch):
    # a memory bank becomes per-client memories and back: the run ends as it would have on the
    # first engine (to the float rounding in which the engines differ)
    from tests.test_vectorized import assert_close_values

    cfg = tiny_config(*RESUMABLE)
    full = run_on(first, cfg, tmp_path / "full")
    stop_after(2)
    run_on(first, cfg, tmp_path / "cut")
    monkeypatch.undo()
    resumed = run_on(second, cfg, tmp_path / "cut", resume=True)
    rows_full, rows_cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["round"] for r in rows_cut] == [r["round"] for r in rows_full]
    for a, b in zip(rows_full, rows_cut):
        assert_close_values(without_timing(a), without_timing(b), f"round {a['round']}")
    assert full.keys() == resumed.keys()
    for c in full:
        for k in full[c]:
            assert torch.allclose(full[c][k], resumed[c][k], rtol=1e-4, atol=1e-5), (c, k)


def cli(*args: str, cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedmaml", *args], cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_sigterm_checkpoints_a_cli_run_a_rerun_says_how_to_resume_and_resume_finishes_it(
        tiny_config, tmp_path):
    rounds = 150
    cfg = tiny_config("algorithm.name=moml", f"federated.rounds={rounds}", "federated.eval_every=50",
                      f"output_dir={tmp_path / 'out'}")
    config = tmp_path / "c.yaml"
    config.write_text(dump_yaml(cfg))
    run_dir = tmp_path / "out" / "tiny"
    proc = cli("run", str(config), "--quiet", cwd=tmp_path)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists()
                                           or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    summary = read_summary(run_dir)
    assert summary["status"] == "interrupted", "the run ended before the signal: make it longer"
    stopped = checkpoint.load(run_dir)["round"]
    assert 4 <= stopped < rounds
    assert "SIGTERM: stopping after this round with a checkpoint" in err
    assert f"interrupted after round {stopped}; resume with `fedmaml run --resume {run_dir}`" in err

    # Running the config again does not silently start over in tiny-2.
    again = cli("run", str(config), "--quiet", cwd=tmp_path)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 2
    assert (f"error: {run_dir} is an unfinished run of this config (checkpoint after round "
            f"{stopped} of {rounds}); resume it with `fedmaml run --resume {run_dir}`") in err
    assert not (tmp_path / "out" / "tiny-2").exists()

    resumed = cli("run", "--resume", str(run_dir), "--quiet", cwd=tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    full = run_experiment(cfg, quiet=True, run_dir=tmp_path / "full")
    assert [without_timing(r) for r in read_metrics(full)] == \
        [without_timing(r) for r in read_metrics(run_dir)]
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (full, run_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_memories_go_through_the_checkpoint_and_the_resume_is_bitwise_identical(
        tiny_config, tmp_path, stop_after, monkeypatch, ray_guard):
    # Ray keeps each node's Context.state inside Flower's simulation: the checkpoint asks every
    # client for its memory (query.memory) and the resume hands it back. Three Ray starts: about
    # 1-3 minutes on 2 busy cores.
    from test_faults import check_counts

    cfg = tiny_config(*RESUMABLE, "engine.name=ray", "engine.num_cpus=1")
    stop_at = random.randint(1, ROUNDS - 1)
    full = run_experiment(cfg, quiet=True, run_dir=tmp_path / "full")
    stop_after(stop_at)
    run_experiment(cfg, quiet=True, run_dir=tmp_path / "cut")
    monkeypatch.undo()
    saved = checkpoint.load(tmp_path / "cut")
    assert saved["round"] == stop_at
    rows = read_metrics(tmp_path / "cut")
    worked = {c for r in rows[1:] for c in r["clients"]
              if faults.client_fault(cfg, c, r["round"]) in (None, "straggle")}
    memories = saved["memories"]["clients"]
    assert set(memories) == worked  # every client that trained, with a memory of its tasks
    assert all(v.shape[0] == 1 for m in memories.values() for v in m.values())
    run_experiment(cfg, quiet=True, run_dir=tmp_path / "cut", resume=True)
    # memories are compared through what they determine: every client's memory-based evaluation
    # (seen.memory-loss.clients at rounds 2, 4, 6), inside the rows compared bit for bit
    assert "seen.memory-loss.clients" in read_metrics(full)[-1]["eval"]
    assert_same_run(full, tmp_path / "cut")
    check_counts(cfg, tmp_path / "cut")


def test_a_sweep_resumes_its_interrupted_run_from_the_checkpoint(tiny_config, tmp_path, stop_after,
                                                               monkeypatch):
    from fedmaml.sweep import SweepSpec, run_sweep

    base = tiny_config(*RESUMABLE)
    spec = SweepSpec(grid={"algorithm.beta": (0.3, 0.9)}, seeds=(0,))
    run_sweep(base, spec, tmp_path / "whole", quiet=True)
    stop_after(3)  # the first run of the sweep stops after round 3
    with pytest.raises(KeyboardInterrupt):
        run_sweep(base, spec, tmp_path / "cut", quiet=True)
    monkeypatch.undo()
    first = tmp_path / "cut" / "beta=0.3,seed=0"
    assert checkpoint.load(first)["round"] == 3 and not (tmp_path / "cut" / "beta=0.9,seed=0").exists()
    kept = (first / "metrics.jsonl").read_text()
    result = run_sweep(base, spec, tmp_path / "cut", quiet=True)
    assert result.ran == ["beta=0.3,seed=0", "beta=0.9,seed=0"] and not result.failed
    # continued, not restarted: rounds 0-3 are the very lines written before (timing included)
    assert (first / "metrics.jsonl").read_text().startswith(kept) and kept.count("\n") == 4
    for name in result.ran:
        assert_same_run(tmp_path / "whole" / name, tmp_path / "cut" / name)


def test_a_device_memory_is_referenced_never_sent(tmp_path, tiny_config):
    from flwr.app import ConfigRecord, RecordDict

    from flwr.supercore.task_identity import TaskIdentity

    from fedmaml.engines.inprocess import SERVER_NODE_ID
    from fedmaml.errors import DataError
    from fedmaml.federated.memory_store import FileStore, digest

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SERVER_NODE_ID
    like = setup_for(tiny_config()).initial_params
    store = FileStore(tmp_path, 3, like=like)
    store.save({k: v.unsqueeze(0) + 1 for k, v in like.items()})

    def ask(op: str, store=store, **extra) -> Message:
        msg = Message(RecordDict({R.CONFIG: ConfigRecord({checkpoint.OP: op, **extra})}), 5,
                      checkpoint.MEMORY_QUERY, group_id="checkpoint")
        msg.metadata.__dict__["_message_id"] = "m1"
        return checkpoint.memory_query_reply(msg, store, 3, like)

    reply = ask(checkpoint.GET, **{checkpoint.SEND: 1})  # even when the server asks for it
    assert R.ARRAYS not in reply.content  # the memory stays on the device
    sha = digest(store.path.read_bytes())
    assert dict(reply.content[R.CONFIG]) == {checkpoint.FILE: str(store.path), checkpoint.SHA256: sha}
    ask(checkpoint.SET, **{checkpoint.SHA256: sha})  # the file still matches: nothing to do
    store.save({k: v.unsqueeze(0) for k, v in like.items()})  # the device trained on since
    with pytest.raises(DataError, match=rf"memory file {store.path} has sha256 \w+, the checkpoint "
                                        rf"expects {sha}: the device's memory moved on"):
        ask(checkpoint.SET, **{checkpoint.SHA256: sha})
    # A memory in a SuperNode's Context.state is sent only to a simulation's server: a deployment's
    # checkpoint gets its fingerprint.
    state = ContextStateStore(Context(run_id=1, node_id=5, node_config={}, state=RecordDict(),
                                      run_config={}))
    state.save({k: v.unsqueeze(0) + 2 for k, v in like.items()})
    reply = ask(checkpoint.GET, store=state)
    assert R.ARRAYS not in reply.content and reply.content[R.CONFIG][checkpoint.SHA256]
    ask(checkpoint.SET, store=state, **{checkpoint.SHA256: reply.content[R.CONFIG][checkpoint.SHA256]})
    sent = ask(checkpoint.GET, store=state, **{checkpoint.SEND: 1})
    assert torch.equal(dict(sent.content[R.ARRAYS].to_torch_state_dict())[next(iter(like))],
                       next(iter(like.values())).unsqueeze(0) + 2)


def test_a_pattern_selection_made_before_the_stop_survives_the_resume(tiny_config, tmp_path,
                                                                     stop_after, monkeypatch):
    # The selection measures time, so two runs may choose differently: the resumed run must keep
    # the choice of the run it continues (and the record, as the summary reports it).
    cfg = tiny_config("federated.rounds=4", "pattern_selection.mode=central",
                      "pattern_selection.at_round=1", "pattern_selection.repeats=1",
                      "pattern_selection.warmup=0", "pattern_selection.validation_clients=2")
    stop_after(2)
    run_experiment(cfg, quiet=True, run_dir=tmp_path / "cut")
    monkeypatch.undo()
    saved = checkpoint.load(tmp_path / "cut")
    chosen = json.loads(saved["strategy"]["selector"]["record"])["chosen"]
    run_experiment(cfg, quiet=True, run_dir=tmp_path / "cut", resume=True)
    summary = read_summary(tmp_path / "cut")
    assert summary["status"] == "completed" and summary["pattern_selection"]["chosen"] == chosen
