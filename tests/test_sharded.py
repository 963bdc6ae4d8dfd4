"""The sharded engine (fedmaml/engines/sharded.py) on a real two-node Ray cluster started here
(Ray's own ``cluster_utils``: a head and a worker node, each a raylet with its own resources):

* the same sampled clients, memories and metrics as the single-process vectorized engine (1 shard:
  bitwise; 2 shards: to float rounding, since each client's update is vmapped with other
  clients) for every algorithm family, repeated runs bitwise equal, a 2-shard checkpoint resumed
  on 1 and on 3 shards;
* an actor killed with ``kill -9`` in the middle of a round: its clients of that round fail; with a
  checkpoint after every round the shard comes back from it and the run goes on; when memories
  are lost the run stops resumable and the resumed run equals a run that never failed;
* a node that leaves in the middle of a round and comes back.

Plain tests of the shard assignment, the shard's bank and the joining of replies run without Ray.
Every Ray process started here is stopped here (the cluster's, then any left in its session).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmaml.config import replace_paths
from fedmaml.engines.inprocess import FIRST_CLIENT_NODE
from fedmaml.engines.shards import (ShardBank, ShardWorker, detach_arrays, merge_bank_states, merge_evaluate, merge_train,
                                    shard_message, split, split_bank_state)
from fedmaml.engines.vectorized import run_vectorized
from fedmaml.errors import FedmamlError
from fedmaml.federated import checkpoint, codec
from fedmaml.federated import records as R
from fedmaml.federated.client_app import make_client_app
from fedmaml.federated.server_app import make_server_app
from fedmaml.federated.server_round import needs_every_update
from fedmaml.federated.setup import setup_for
from fedmaml.federated.strategy import MetaStrategy
from fedmaml.results.recorder import MODEL_FILE, read_metrics, read_summary
from tests.shard_faults import HOLD_ENV
from tests.test_checkpoint import stop_after  # noqa: F401 - a fixture
from tests.test_vectorized import CASES as VECTORIZED_CASES

TIMING = ("seconds", "train_seconds_max", "adapt-ms")
MOML = ("algorithm.name=moml", "federated.rounds=4", "federated.eval_every=2",
        "model.loss=shard_faults:mse_or_hold")


# -- without Ray -----------------------------------------------------------------------------------

def test_clients_go_to_the_shard_of_their_id_and_a_shard_bank_keeps_global_ids():
    assert split([5, 0, 3, 4, 1], 2) == [[0, 4], [5, 3, 1]]
    like = {"w": torch.zeros(2)}
    banks = [ShardBank(like, 7, k, 3) for k in range(3)]
    for k, bank in enumerate(banks):
        ids = list(range(k, 7, 3))[::-1]
        bank.write(ids, {"w": torch.tensor([[[float(c), -c]] for c in ids])})
    with pytest.raises(IndexError, match="not in shard 1 of 3"):
        banks[1].read([0])
    state = merge_bank_states([b.state_dict() for b in banks], 7)
    assert sorted(state["client_ids"].tolist()) == list(range(7))
    # the merged state split for 2 shards: every client in the shard of its id, its memory intact
    for k, part in enumerate(split_bank_state(state, 2)):
        other = ShardBank(like, 7, k, 2)
        other.load_state_dict(state)
        assert sorted(other.client_ids().tolist()) == sorted(part["client_ids"].tolist())
        for c in other.client_ids().tolist():
            assert torch.equal(other.read([c])["w"], torch.tensor([[[float(c), -c]]]))


def test_replies_are_joined_and_a_dead_shard_fails_its_clients():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # as the engines do
    like = {"w": torch.zeros(2)}

    def reply(cids, failures=()):
        metrics = MetricRecord({R.PARTITION: cids, R.NUM_EXAMPLES: [1] * len(cids),
                                "samples": [1] * len(cids), "train-seconds": [0.1] * len(cids)})
        delta = {"w": torch.tensor([[float(c), 1.0] for c in cids]).reshape(len(cids), 2)}
        return Message(RecordDict({R.ARRAYS: codec.encode(delta), R.METRICS: metrics,
                                   R.FAILURES: R.failure_record(list(failures))}), 2, "train")

    def part(cids, answer):
        return cids, answer, detach_arrays(answer) if isinstance(answer, Message) else None

    died = RuntimeError("gone")
    content = merge_train([part([0, 2], reply([0, 2])), part([1, 3], died),
                           part([5], reply([], [(5, "timeout", "late")])),
                           part([7], reply([7]))], like)
    assert list(content[R.METRICS][R.PARTITION]) == [0, 2, 7]
    assert torch.equal(codec.decode(content[R.ARRAYS])["w"],
                       torch.tensor([[0., 1.], [2., 1.], [7., 1.]]))
    failed = R.failures_from(content[R.FAILURES])
    assert [(c, k) for c, k, _ in failed] == [(1, "error"), (3, "error"), (5, "timeout")]
    assert "shard 1's Ray actor died" in failed[0][2]
    # evaluation rows come back in the panel's order, whichever shard had them
    panel = [3, 0, 1, 2]
    ev = [Message(RecordDict(dict(zip((R.METRICS, R.ABSENT), R.metric_columns(
        [{R.PARTITION: c, "loss": float(c)} for c in cids]))) | {
        R.FAILURES: R.failure_record([])}), 2, "evaluate") for cids in ([0, 2], [3, 1])]
    content = merge_evaluate([([0, 2], ev[0]), ([3, 1], ev[1])], panel)
    assert list(content[R.METRICS][R.PARTITION]) == panel
    error = Message(Error(code=2, reason="bad"), reply_to=ev[0])
    content = merge_evaluate([([0, 2], ev[0]), ([3, 1], error)], panel)
    assert [c for c, _, _ in R.failures_from(content[R.FAILURES])] == [3, 1]


def sharded_round(cfg, shards: int, sums: bool, nan_client: int | None = None, tamper=None):
    """Round 1 of a strategy as the sharded engine runs it (the cohort split by shard, each part
    answered by a :class:`ShardWorker`, the answers merged), with the workers in this process
    instead of Ray actors; ``sums``: the shards send their part sums (else their rows);
    ``nan_client``: that client's update is NaN, as a diverged client's would be; ``tamper``: what
    happens to the merged reply on its way. Returns the strategy, the reply it read and the bytes
    it counted up."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    setup = setup_for(cfg)
    workers = [ShardWorker(cfg, setup.federation.num_clients, k, shards) for k in range(shards)]
    for worker in workers:
        worker.sums = cfg.federated.aggregation if sums else None
        if nan_client is not None:
            worker.grid.send_and_receive = poisoned(worker.grid.send_and_receive, nan_client)
    strategy = MetaStrategy(setup)
    strategy.nodes = workers[0].grid.partition_nodes()
    [msg] = strategy.configure_train(1, R.to_record(strategy.w), ConfigRecord(), workers[0].grid)
    msg.metadata.__dict__["_message_id"] = "cohort"
    parts = []
    for k, cids in enumerate(split([int(c) for c in msg.content[R.CONFIG][R.COHORT]], shards)):
        part = shard_message(msg, cids, FIRST_CLIENT_NODE)
        part.metadata.__dict__["_message_id"] = f"cohort/{k}"
        [(_, answer, arrays)] = workers[k].handle([part], None)
        parts.append((cids, answer, arrays))
    reply = Message(merge_train(parts, setup.initial_params), reply_to=msg)
    if tamper is not None:
        tamper(reply)
    up = R.reply_bytes(reply, strategy.w)
    strategy.aggregate_train(1, [reply])
    return strategy, reply, up


def poisoned(send_and_receive, cid: int):
    """The grid's ``send_and_receive`` with client ``cid``'s update in its cohort reply made NaN."""

    def send(messages, timeout=None):
        replies = list(send_and_receive(messages, timeout=timeout))
        for reply in replies:
            ids = [int(c) for c in reply.content[R.METRICS][R.PARTITION]]
            if cid in ids:
                delta = codec.decode(reply.content[R.ARRAYS])
                next(iter(delta.values()))[ids.index(cid)] = float("nan")
                reply.content[R.ARRAYS] = codec.encode(delta)
        return replies

    return send


def test_shards_send_their_part_of_the_mean_and_the_server_round_takes_it(tiny_config):
    """Summed by part, a shard's round sends one update's bytes instead of its clients' (no
    ``arrays``), counts and rejects what the rows would, and moves ``w`` as the rows do: to the bit
    with one shard, to float rounding with two; a rule that needs every update keeps the rows."""
    cfg = tiny_config("algorithm.name=moml", "data.num_clients=12", "federated.clients_per_round=9",
                      "federated.aggregation=weighted")
    for nan_client in (None, "first"):
        rows, _, up_rows = sharded_round(cfg, 1, sums=False)
        cid = sorted(rows.round_stats["clients"])[0] if nan_client else None
        rows, rows_reply, up_rows = sharded_round(cfg, 1, sums=False, nan_client=cid)
        one, one_reply, up_one = sharded_round(cfg, 1, sums=True, nan_client=cid)
        two, two_reply, up_two = sharded_round(cfg, 2, sums=True, nan_client=cid)
        assert R.ARRAYS in rows_reply.content and R.ARRAYS not in one_reply.content
        assert len(next(iter(codec.decode(two_reply.content[R.PART_SUMS]).values()))) == 2
        for s in (one, two):
            for key in ("replies", "failures", "rejected", "failures_by_kind", "updated"):
                assert s.round_stats[key] == rows.round_stats[key], key
        assert up_one == up_two == up_rows  # counted as the clients' own replies would be
        assert rows.round_stats["rejected"] == (1 if cid is not None else 0)
        assert all(torch.equal(one.w[k], rows.w[k]) for k in rows.w)
        assert not all(torch.equal(rows.w[k], rows.w_before_update[k]) for k in rows.w)
        for k in rows.w:
            torch.testing.assert_close(two.w[k], rows.w[k], rtol=1e-6, atol=1e-7)
    # the sums' weights are the run's: a reply summed otherwise is malformed, nothing is averaged
    strategy, _, _ = sharded_round(
        cfg, 2, sums=True, tamper=lambda r: r.content[R.PARTS].__setitem__(R.WEIGHTING, "uniform"))
    assert strategy.round_stats["failures_by_kind"]["malformed"] == 9
    assert strategy.round_stats["replies"] == 0 and not strategy.round_stats["updated"]
    # an update the server cannot use (a client not sampled) spoils its part: the part's clients
    # fail, the other shard's part is used alone
    def stranger(reply):
        metrics = dict(reply.content[R.METRICS])
        metrics[R.PARTITION] = [10 ** 6, *list(metrics[R.PARTITION])[1:]]
        reply.content[R.METRICS] = MetricRecord(metrics)

    strategy, reply, _ = sharded_round(cfg, 2, sums=True, tamper=stranger)
    first_part = list(reply.content[R.PARTS][R.PART]).count(0)
    assert strategy.round_stats["failures_by_kind"]["malformed"] == first_part
    assert strategy.round_stats["replies"] == 9 - first_part and strategy.round_stats["updated"]
    # a server rule or differential privacy needs every update: those runs send rows
    algorithm = setup_for(cfg).algorithm
    assert not needs_every_update(cfg, algorithm)
    ruled = copy.copy(algorithm)
    ruled.__class__ = type("Ruled", (type(algorithm),), {"server_update": lambda self, s, w: s})
    assert needs_every_update(cfg, ruled)
    private = tiny_config("privacy.clipping=server", "federated.aggregation=uniform")
    assert needs_every_update(private, setup_for(private).algorithm)
    nodes = setup_for(cfg).federation.num_clients
    assert ShardWorker(cfg, nodes, 0, 2).sums == "weighted"  # the run's weighting
    assert ShardWorker(private, nodes, 0, 2).sums is None  # rows


def test_a_row_whose_metric_is_not_a_number_spoils_its_part(tiny_config):
    """A row the server cannot read (its loss is text) whose update a shard summed: that client is
    malformed and the part holding its update cannot be used (its clients fail); the other shard's
    part is used alone."""
    cfg = tiny_config("algorithm.name=moml", "data.num_clients=12", "federated.clients_per_round=9",
                      "federated.aggregation=weighted")

    def text_loss(reply):  # a ConfigRecord can carry text where a MetricRecord would not
        metrics = dict(reply.content[R.METRICS])
        metrics["loss-after"] = ["a loss", *(str(v) for v in list(metrics["loss-after"])[1:])]
        reply.content[R.METRICS] = ConfigRecord(metrics)

    strategy, reply, _ = sharded_round(cfg, 2, sums=True, tamper=text_loss)
    part_of = list(reply.content[R.PARTS][R.PART])
    first_part = part_of.count(part_of[0])
    assert 0 < first_part < 9
    assert strategy.round_stats["failures_by_kind"]["malformed"] == first_part
    assert strategy.round_stats["replies"] == 9 - first_part and strategy.round_stats["updated"]


def test_shards_beyond_the_clients_are_refused_and_beyond_the_memory_warned_of():
    from fedmaml.config import load_config
    from fedmaml.engines.sharded import memory_warning
    from fedmaml.errors import ConfigError

    with pytest.raises(ConfigError, match=r"engine.shards: 9 exceeds the federation's 8 clients"):
        load_config(None, ["engine.name=sharded", "engine.shards=9", "data.num_clients=6",
                           "data.unseen_clients=2"])
    # each local actor holds its imports: far more than the memory has is warned about (connect
    # logs it before it starts Ray)
    warning = memory_warning(100_000)
    assert warning is not None and "100000 shard actors on this machine may need about" in warning
    assert re.search(r"fewer shards \(about \d+\)", warning)
    assert memory_warning(2) is None


def test_a_private_run_in_any_form_sends_rows(tiny_config):
    """Differential privacy in any form (clipping at the server or on the clients, with noise or
    without; noise alone too, a config error) needs every update: the shards send rows, by the
    server round's own rule (server_round.needs_every_update), which the strategy also asks."""
    plain = tiny_config("federated.aggregation=uniform")
    algorithm = setup_for(plain).algorithm
    nodes = setup_for(plain).federation.num_clients
    assert not needs_every_update(plain, algorithm)
    assert ShardWorker(plain, nodes, 0, 2).sums == "uniform"
    for form in (("privacy.clipping=server",), ("privacy.clipping=client",),
                 ("privacy.clipping=server", "privacy.noise_multiplier=1.0"),
                 ("privacy.clipping=client", "privacy.noise_multiplier=0.5")):
        private = tiny_config("federated.aggregation=uniform", *form)
        assert needs_every_update(private, algorithm), form
        assert ShardWorker(private, nodes, 0, 2).sums is None, form
    noise_alone = dataclasses.replace(
        plain, privacy=dataclasses.replace(plain.privacy, noise_multiplier=1.0))
    assert needs_every_update(noise_alone, algorithm)


def test_a_checkpoint_without_memories_resumes_on_an_engine_with_a_memory_bank(
        tiny_config, tmp_path, stop_after):  # noqa: F811
    # FedAvg keeps no memory: its checkpoint's bank is None, which the vectorized and sharded
    # engines' resume once took for per-client memories (KeyError 'clients')
    from fedmaml.experiment import run_experiment

    cfg = tiny_config("algorithm.name=fedavg", "engine.name=vectorized", "federated.rounds=3")
    stop_after(1)
    run_dir = run_experiment(cfg, quiet=True, run_dir=tmp_path / "fedavg")
    stop_after(10 ** 6)
    assert checkpoint.load(run_dir)["memories"] == {"bank": None}
    run_experiment(cfg, quiet=True, run_dir=run_dir, resume=True)
    assert read_summary(run_dir)["status"] == "completed"


# -- a real cluster ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node (1 CPU) and a worker node (2 CPUs); this process connected as the driver.
    Actors inherit the environment of the raylets, so the fault-test loss finds its file."""
    import ray
    from ray.cluster_utils import Cluster

    from fedmaml.engines.ray_engine import worker_runtime_env
    from fedmaml.engines.ray_session import SessionRecord, start_time

    hold = tmp_path_factory.mktemp("hold") / "hold"
    os.environ[HOLD_ENV] = str(hold)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    session = None
    try:
        session = SessionRecord(c.head_node.get_session_dir_path(), os.getpid(),
                                start_time(os.getpid()))
        c.worker = c.add_node(num_cpus=2)
        c.wait_for_nodes()
        ray.init(address=c.address, runtime_env=worker_runtime_env(), logging_level="ERROR",
                 log_to_driver=False)
        c.hold = hold
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
        os.environ.pop(HOLD_ENV, None)
        if session is not None:  # agents and workers the raylets left: stopped by pid
            assert session.stop(grace=5.0) == []


def run_sharded_here(cfg, run_dir: Path, resume: bool = False, during=None):
    """A run on the sharded engine, this process the driver; with ``during(done)``, the run goes
    in another thread while ``during`` runs here (Ray's cluster utilities want the main thread)
    until the run is ``done``. Returns (rows, model, memories by client id, grid)."""
    from fedmaml.engines.sharded import ShardedGrid, run_on_grid

    setup = setup_for(cfg)
    grid = ShardedGrid(cfg, setup.federation.num_clients + setup.federation.num_unseen, run_dir)
    done, failure = threading.Event(), []

    def run():
        try:
            run_on_grid(make_server_app(cfg, run_dir, quiet=True, resume=resume), grid)
        except BaseException as e:  # noqa: BLE001 - raised again in the test's thread
            failure.append(e)
        finally:
            done.set()

    try:
        if during is None:
            run()
        else:
            worker = threading.Thread(target=run)
            worker.start()
            during(done)
            worker.join()
        if failure:
            raise failure[0]
        try:
            memories = grid.memory_state()
        except FedmamlError:  # a shard's memories were lost: the run stopped
            memories = None
    finally:
        grid.close()
    return read_metrics(run_dir), load_model(run_dir), bank_dict(memories), grid


def run_vectorized_here(cfg, run_dir: Path):
    setup = setup_for(cfg)
    grid = run_vectorized(make_server_app(cfg, run_dir, quiet=True), make_client_app(cfg),
                          setup.federation.num_clients + setup.federation.num_unseen, cfg)
    memories = grid.memory_state()
    grid.close()
    return read_metrics(run_dir), load_model(run_dir), bank_dict(memories)


def load_model(run_dir: Path):
    return torch.load(run_dir / MODEL_FILE, weights_only=True)


def bank_dict(state) -> dict:
    return {} if state is None else checkpoint.bank_to_clients(state)


def without_timing(row):
    if isinstance(row, dict):
        return {k: without_timing(v) for k, v in row.items()
                if k not in TIMING and ".adapt-ms." not in k}
    return row


def assert_bitwise(a, b):
    rows_a, model_a, mem_a = a[:3]
    rows_b, model_b, mem_b = b[:3]
    assert [without_timing(r) for r in rows_a] == [without_timing(r) for r in rows_b]
    assert model_a.keys() == model_b.keys() and all(torch.equal(model_a[k], model_b[k])
                                                    for k in model_a)
    assert mem_a.keys() == mem_b.keys()
    assert all(torch.equal(mem_a[c][k], mem_b[c][k]) for c in mem_a for k in mem_a[c])


def assert_close(a, b):
    rows_a, model_a, mem_a = a[:3]
    rows_b, model_b, mem_b = b[:3]
    assert [r.get("clients") for r in rows_a] == [r.get("clients") for r in rows_b]
    for x, y in zip(rows_a, rows_b):
        x, y = without_timing(x), without_timing(y)
        assert json.dumps(sorted(x)) == json.dumps(sorted(y))
        for k in ("replies", "failures", "samples", "bytes_up", "bytes_down"):
            assert x.get(k) == y.get(k), k
        for k in ("loss_after", "loss_before"):
            if k in x:
                assert x[k] == pytest.approx(y[k], rel=1e-5), k
        for k, v in x.get("eval", {}).items():
            if isinstance(v, float):
                assert v == pytest.approx(y["eval"][k], rel=1e-4, abs=1e-6), k
            elif k.endswith(".clients"):  # per-client values (null where a client has none)
                assert [u is None for u in v] == [u is None for u in y["eval"][k]], k
                assert [u for u in v if u is not None] == pytest.approx(
                    [u for u in y["eval"][k] if u is not None], rel=1e-4, abs=1e-6), k
            else:
                assert v == y["eval"][k], k
    for k in model_a:
        torch.testing.assert_close(model_a[k], model_b[k], rtol=1e-5, atol=1e-6)
    assert mem_a.keys() == mem_b.keys()
    for c in mem_a:
        for k in mem_a[c]:
            torch.testing.assert_close(mem_a[c][k], mem_b[c][k], rtol=1e-5, atol=1e-6)


@pytest.mark.ray
@pytest.mark.slow
def test_shards_give_the_vectorized_engines_run_and_a_checkpoint_resumes_on_other_shards(
        cluster, tiny_config, tmp_path, stop_after):  # noqa: F811
    cfg = tiny_config(*MOML, "engine.name=sharded", "engine.shards=2")
    shards = lambda n: replace_paths(cfg, {"engine.shards": n})  # noqa: E731
    vectorized = run_vectorized_here(replace_paths(cfg, {"engine.name": "vectorized"}),
                                     tmp_path / "vectorized")
    one = run_sharded_here(shards(1), tmp_path / "one")
    assert_bitwise(one, vectorized)  # one shard: the same vmapped calls
    two = run_sharded_here(cfg, tmp_path / "two")
    assert {s["node_id"] for s in two[3].actors.where.values()} == {
        cluster.head_node.node_id, cluster.worker.node_id}  # spread: a shard on each node
    assert_close(two, vectorized)
    assert_bitwise(run_sharded_here(cfg, tmp_path / "two-again"), two)
    assert all(r["failures"] == 0 for r in two[0][1:])
    assert two[2] and "seen.memory-loss.mean" in two[0][-1]["eval"]
    # a checkpoint of 2 shards after round 2, resumed on 1 and on 3 shards
    stop_after(2)
    run_sharded_here(cfg, tmp_path / "cut")
    stop_after(10 ** 6)
    assert read_summary(tmp_path / "cut")["status"] == "interrupted"
    for n in (1, 3):
        run_dir = tmp_path / f"resumed-on-{n}"
        shutil.copytree(tmp_path / "cut", run_dir)
        resumed = run_sharded_here(shards(n), run_dir, resume=True)
        assert read_summary(run_dir)["status"] == "completed"
        assert_close(resumed, two)


# Every algorithm family, both modes, second order, Lambda patterns and the Hessian-free estimator
# (tests/test_vectorized.py's cases): shards train with the vectorized engine's grid, so each is
# the single-process run to float rounding.
ALGORITHM_CASES = ("moml-mixed-so", "per_fedavg-hf", "fedmeta-so", "reptile", "fedavg",
                   "silo-moml-decay")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("case", ALGORITHM_CASES)
def test_every_algorithm_on_two_shards_equals_the_vectorized_engine(cluster, tiny_config,
                                                                      tmp_path, case):
    cfg = tiny_config(*VECTORIZED_CASES[case], "federated.rounds=3", "federated.eval_every=3",
                      "engine.name=sharded", "engine.shards=2")
    vectorized = run_vectorized_here(replace_paths(cfg, {"engine.name": "vectorized"}),
                                     tmp_path / "vectorized")
    assert_close(run_sharded_here(cfg, tmp_path / "two"), vectorized)


def hold_then(cluster, where: str, server_round: int, act, held: list):
    """Arm the hold: the actor of shard ``where`` (or on node ``node:<id>``) training round
    ``server_round`` waits there; then ``act(pid)``, and ``held`` gets the pid. The helper gives up
    when the run ends without a hold (the test then fails on ``held``)."""
    cluster.hold.write_text(f"{server_round} {where}")
    pid_file = Path(f"{cluster.hold}.pid")

    def during(done):
        while not pid_file.exists():
            if done.is_set():
                cluster.hold.unlink(missing_ok=True)
                return
            time.sleep(0.05)
        pid = int(pid_file.read_text())
        act(pid)
        held.append(pid)
        pid_file.unlink()
        Path(f"{cluster.hold}.taken").unlink()

    return during


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def failed_rounds(rows) -> dict[int, list]:
    return {r["round"]: r for r in rows[1:] if r["failures"]}


@pytest.mark.ray
@pytest.mark.slow
def test_an_actor_killed_mid_round_fails_its_clients_then_comes_back_or_stops_resumable(
        cluster, tiny_config, tmp_path):
    # a checkpoint after every round: the shard killed in round 3 comes back from round 2's
    cfg = tiny_config(*MOML, "engine.name=sharded", "federated.checkpoint_every=1")
    held: list[int] = []
    rows, _, memories, grid = run_sharded_here(
        cfg, tmp_path / "restored", during=hold_then(cluster, "1", 3, kill9, held))
    assert held, "shard 1 did not train in round 3"
    assert read_summary(tmp_path / "restored")["status"] == "completed"
    assert [(d["shard"], d["round"]) for d in grid.deaths] == [(1, 3)]
    failed = failed_rounds(rows)
    assert list(failed) == [3]
    shard1 = [c for c in failed[3]["clients"] if c % 2 == 1]
    assert failed[3]["failures"] == failed[3]["failures_by_kind"]["error"] == len(shard1) > 0
    # every client that ever replied has its memory: shard 1's from round 2's checkpoint
    replied = {c for r in rows[1:] for c in r["clients"] if not (r["round"] == 3 and c % 2)}
    assert set(memories) == replied

    # a checkpoint every 2 rounds: shard 1 trained in round 3, then is killed in round 4, so its
    # memories of round 3 are lost. Round 4 is recorded, then the run stops, resumable from round
    # 2's checkpoint (round 4's was refused), and the resumed run is the run that never failed.
    cfg = tiny_config(*MOML, "engine.name=sharded", "federated.rounds=5",
                      "federated.checkpoint_every=2")
    run_dir, held = tmp_path / "lost", []
    rows, *_ = run_sharded_here(cfg, run_dir, during=hold_then(cluster, "1", 4, kill9, held))
    assert held and any(c % 2 for c in rows[3]["clients"])
    summary = read_summary(run_dir)
    assert summary["status"] == "interrupted"
    assert f"resume with `fedmaml run --resume {run_dir}`" in summary["message"]
    assert rows[-1]["round"] == 4 and list(failed_rounds(rows)) == [4]
    assert checkpoint.load(run_dir)["round"] == 2
    resumed = run_sharded_here(cfg, run_dir, resume=True)
    assert read_summary(run_dir)["status"] == "completed"
    assert_bitwise(resumed, run_sharded_here(cfg, tmp_path / "never-failed"))


@pytest.mark.ray
@pytest.mark.slow
def test_more_shards_than_the_cluster_can_place_are_refused_with_its_resources(cluster,
                                                                              tiny_config):
    from fedmaml.engines.sharded import ShardActors
    from fedmaml.errors import ConfigError

    cfg = tiny_config(*MOML, "engine.name=sharded", "engine.shards=4", "engine.num_cpus=1",
                      "engine.discovery_timeout=2")  # the cluster has 3 CPUs
    with pytest.raises(ConfigError, match=r"engine.shards: the Ray cluster cannot place 4 shard "
                                          r"actors of \{'CPU': 1"):
        ShardActors(cfg, 10)


@pytest.mark.ray
@pytest.mark.slow
def test_an_actor_that_fails_as_it_starts_says_why_at_once(cluster, tiny_config):
    # its own error (here no CUDA device on the node) would repeat: no retries until the timeout
    from fedmaml.engines.sharded import ShardActors

    cfg = tiny_config(*MOML, "engine.name=sharded", "engine.shards=2", "engine.device=cuda",
                      "engine.discovery_timeout=120")
    start = time.monotonic()
    with pytest.raises(FedmamlError, match=r"shard 0's actor failed as it started: .*cuda"):
        ShardActors(cfg, 10)
    assert time.monotonic() - start < 60


@pytest.mark.ray
@pytest.mark.slow
def test_a_hung_actor_times_out_like_a_dead_one(cluster, tiny_config, tmp_path):
    """Shard 1's actor hangs in round 3 (it holds and nobody kills it): the driver waits the round's
    bound (round_timeout per client of the shard, plus engine.discovery_timeout), stops the actor,
    fails its clients as if it had died (saying it timed out), and the run goes on with a new
    actor from round 2's checkpoint."""
    # round_timeout bounds each client's share of its shard's round: 6 s, not less, so that the
    # healthy rounds of a heavily loaded machine stay within it (2 s let a slow first round fail)
    cfg = tiny_config(*MOML, "engine.name=sharded", "federated.checkpoint_every=1",
                      "federated.round_timeout=6", "engine.discovery_timeout=20")
    held: list[int] = []
    rows, _, _, grid = run_sharded_here(cfg, tmp_path / "hung",
                                        during=hold_then(cluster, "1", 3, lambda pid: None, held))
    assert held, "shard 1 did not train in round 3"
    assert read_summary(tmp_path / "hung")["status"] == "completed"
    assert [(d["shard"], d["round"]) for d in grid.deaths] == [(1, 3)]
    assert "timed out in round 3" in grid.deaths[0]["reason"]
    failed = failed_rounds(rows)
    assert list(failed) == [3]
    shard1 = [c for c in failed[3]["clients"] if c % 2 == 1]
    assert failed[3]["failures"] == failed[3]["failures_by_kind"]["error"] == len(shard1) > 0


@pytest.mark.ray
@pytest.mark.slow
def test_a_node_that_leaves_mid_round_and_comes_back(cluster, tiny_config, tmp_path):
    """The shard on the worker node holds in round 2; the node goes (its raylet and workers are
    killed) and a new node joins: the shard's new actor can only start there (the head's one CPU
    runs the other shard), with its memories from round 1's checkpoint, and the run goes on."""
    cfg = tiny_config(*MOML, "engine.name=sharded", "federated.checkpoint_every=1",
                      "federated.rounds=3", "federated.clients_per_round=4")

    def node_leaves_and_comes_back(pid):
        cluster.remove_node(cluster.worker, allow_graceful=False)
        cluster.worker = cluster.add_node(num_cpus=2)

    held: list[int] = []
    run_dir = tmp_path / "node"
    rows, _, memories, grid = run_sharded_here(
        cfg, run_dir, during=hold_then(cluster, f"node:{cluster.worker.node_id}", 2,
                                       node_leaves_and_comes_back, held))
    assert held
    assert read_summary(run_dir)["status"] == "completed"
    (death,) = grid.deaths
    assert death["round"] == 2 and list(failed_rounds(rows)) == [2]
    assert grid.actors.where[death["shard"]]["node_id"] == cluster.worker.node_id
    replied = {c for r in rows[1:] for c in r["clients"]
               if not (r["round"] == 2 and c % 2 == death["shard"])}
    assert set(memories) == replied
