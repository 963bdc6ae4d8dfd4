"""Engines run the same ClientApp and ServerApp: the in-process grid's own semantics, and the
in-process and Ray engines giving the same run (real Ray, through Flower's ``run_simulation``)."""

from __future__ import annotations

import math
import time

import pytest
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from fedmaml.config import replace_path
from fedmaml.engines.inprocess import FIRST_CLIENT_NODE, SERVER_NODE_ID, InProcessGrid
from fedmaml.experiment import run_experiment
from fedmaml.results.recorder import read_metrics
from tests.helpers import SimulatedClock

TIMING_KEYS = ("seconds", "train_seconds_max")


def counting_app() -> ClientApp:
    """A ClientApp whose query handler counts its calls in the node's state and raises on node 3."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        if int(context.node_config["partition-id"]) == 3:
            raise ValueError("node 3 is broken")
        calls = int(context.state.metric_records.get("n", MetricRecord({"calls": 0}))["calls"]) + 1
        context.state["n"] = MetricRecord({"calls": calls})
        return Message(RecordDict({"m": MetricRecord({"calls": calls})}), reply_to=msg)

    return app


def test_inprocess_grid_contexts_persist_are_lazy_and_errors_become_replies():
    # Messages take their sender from the task identity, which run_inprocess sets for a whole run.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SERVER_NODE_ID
    grid = InProcessGrid(counting_app(), num_nodes=1_000_000)

    def ask(cid: int) -> Message:
        msg = Message(RecordDict(), cid + FIRST_CLIENT_NODE, "query", group_id="t")
        (reply,) = grid.send_and_receive([msg])
        return reply

    assert [int(ask(5).content["m"]["calls"]) for _ in range(3)] == [1, 2, 3]  # state persists
    assert int(ask(999_999).content["m"]["calls"]) == 1
    broken = ask(3)
    assert broken.has_error() and "node 3 is broken" in broken.error.reason
    assert sorted(grid.contexts) == [3 + FIRST_CLIENT_NODE, 5 + FIRST_CLIENT_NODE,
                                     999_999 + FIRST_CLIENT_NODE]  # only contacted nodes


def comparable(row: dict) -> dict:
    out = {k: v for k, v in row.items() if k not in TIMING_KEYS}
    if "eval" in out:
        out["eval"] = {k: v for k, v in out["eval"].items() if ".adapt-ms." not in k}
    return out


def assert_rows_close(a: dict, b: dict, where: str = "") -> None:
    assert a.keys() == b.keys(), where
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            assert_rows_close(x, y, f"{where}.{k}")
        elif isinstance(x, list):
            assert len(x) == len(y), f"{where}.{k}"
            for i, (p, q) in enumerate(zip(x, y)):
                assert_rows_close({"v": p}, {"v": q}, f"{where}.{k}[{i}]")
        elif isinstance(x, float) and not isinstance(x, bool):
            assert math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-7), (f"{where}.{k}", x, y)
        else:
            assert x == y, (f"{where}.{k}", x, y)


@pytest.mark.ray
@pytest.mark.slow
def test_inprocess_and_ray_engines_agree(tiny_config, tmp_path, ray_guard, capfd):
    # Measured: about 25-50 s on 2 busy cores, nearly all of it starting Ray (ray.init alone took
    # 18 s at load 9); the in-process run of the same config takes under a second.
    cfg = tiny_config("algorithm.name=moml", "federated.rounds=3", "federated.eval_every=1",
                      "federated.clients_per_round=2", "engine.num_cpus=1")
    start = time.perf_counter()
    ray_dir = run_experiment(replace_path(cfg, "engine.name", "ray"), quiet=True,
                             run_dir=tmp_path / "ray")
    ray_seconds = time.perf_counter() - start
    local_dir = run_experiment(cfg, quiet=True, run_dir=tmp_path / "inprocess")

    out, err = capfd.readouterr()
    assert out == "" and err == "", f"quiet run printed:\n{out}\n{err}"

    ray_rows, local_rows = read_metrics(ray_dir), read_metrics(local_dir)
    assert [r["round"] for r in ray_rows] == [0, 1, 2, 3]
    assert [r.get("clients") for r in ray_rows] == [r.get("clients") for r in local_rows]
    for a, b in zip(ray_rows, local_rows):
        assert_rows_close(comparable(a), comparable(b), f"round {a['round']}")
    assert all(r["failures"] == 0 for r in ray_rows[1:])
    assert "seen.memory-loss.mean" in ray_rows[-1]["eval"]  # memories persisted on Ray's nodes
    ray_model = torch.load(ray_dir / "model.pt", weights_only=True)
    local_model = torch.load(local_dir / "model.pt", weights_only=True)
    for k in local_model:
        torch.testing.assert_close(ray_model[k], local_model[k], rtol=1e-5, atol=1e-7)
    print(f"ray engine run: {ray_seconds:.1f}s")


class QueuedGrid(InProcessGrid):
    """A polling grid over the in-process one: pushed messages are answered by the ClientApp, but
    each reply is released only after ``delay`` pulls (how replies trickle in from Ray or a
    SuperLink); node 3 never answers."""

    synchronous = False

    def __init__(self, client_app: ClientApp, num_nodes: int, delay: int) -> None:
        super().__init__(client_app, num_nodes)
        self.delay, self.pulls, self._queued = delay, 0, {}

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            (reply,) = super().send_and_receive([msg])
            mid = reply.metadata.reply_to_message_id
            if msg.metadata.dst_node_id != 3 + FIRST_CLIENT_NODE:
                self._queued[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        if self.pulls < self.delay:
            return []
        return [self._queued.pop(m) for m in list(message_ids) if m in self._queued]


def test_exchange_polls_a_grid_until_all_replies_or_the_timeout(monkeypatch):
    from fedmaml.federated import strategy
    from fedmaml.federated.strategy import MAX_POLL_SECONDS, exchange

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SERVER_NODE_ID
    grid = QueuedGrid(counting_app(), 5, delay=4)

    def messages(nodes):
        return [Message(RecordDict(), FIRST_CLIENT_NODE + n, "query", group_id="1") for n in nodes]

    clock = SimulatedClock()
    monkeypatch.setattr(strategy, "time", clock)
    replies = exchange(grid, messages([0, 1, 2]), timeout=None, poll_interval=0.01)
    assert sorted(r.metadata.src_node_id for r in replies) == [2, 3, 4] and grid.pulls == 4
    # 3 sleeps of the poll interval, not Flower's 0.1 s (simulation) or 3 s (SuperLink) each
    assert clock.sleeps == pytest.approx([0.01, 0.01, 0.01])
    # node 3 never answers: the others' replies come back when the timeout ends the wait
    grid.pulls, clock.now, clock.sleeps = 0, 0.0, []
    replies = exchange(grid, messages([0, 3]), timeout=0.3, poll_interval=0.02)
    assert [r.metadata.src_node_id for r in replies] == [FIRST_CLIENT_NODE]
    assert 0.3 <= clock.now < 0.3 + 0.03  # stopped by the first poll at or after the deadline
    assert grid.pulls == len(clock.sleeps) + 1
    # a long wait polls less and less often: every tenth of the time waited (at most 1 s), not
    # every 1 ms; each sleep follows from the time waited before it
    grid.pulls, clock.now, clock.sleeps = 0, 0.0, []
    exchange(grid, messages([3]), timeout=100.0, poll_interval=0.001)
    waited = 0.0
    for sleep in clock.sleeps:
        assert sleep == pytest.approx(min(MAX_POLL_SECONDS, max(0.001, waited / 10)))
        waited += sleep
    assert clock.sleeps[-1] == MAX_POLL_SECONDS and 100 <= grid.pulls <= 200, grid.pulls
    # a synchronous grid (the in-process engine) is called once, without polling
    sync = InProcessGrid(counting_app(), 2)
    clock.sleeps = []
    assert len(exchange(sync, messages([0, 1]), timeout=None, poll_interval=10.0)) == 2
    assert clock.sleeps == []


class UnknownNodesGrid(QueuedGrid):
    """A polling grid that, like Flower's Ray simulation, does not know which node serves which
    client id: discovery asks them (node 3 never answers)."""

    partition_nodes = None


def test_discovery_waits_the_configured_time_and_advises_for_the_kind_of_federation(tiny_config):
    from fedmaml.errors import MessageError
    from fedmaml.federated.client_app import make_client_app
    from fedmaml.federated.discovery import PartitionDirectory

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SERVER_NODE_ID
    app = make_client_app(tiny_config())
    directory = PartitionDirectory(UnknownNodesGrid(app, 5, delay=1), 5)
    start = time.monotonic()
    with pytest.raises(MessageError, match=r"1 of the 5 simulated nodes \(one per client id, in Ray "
                                           r"actors\) did not answer within 2s.*raise "
                                           r"engine.discovery_timeout"):
        directory.discover(2.0, simulation=True)
    # the configured 2 s, not engine.discovery_timeout's default of 300 s (a loose upper bound: a
    # loaded machine may add seconds, never minutes)
    assert 2.0 <= time.monotonic() - start < 60.0
    # a deployment starts without the missing SuperNode (it may connect later)
    nodes = PartitionDirectory(UnknownNodesGrid(app, 5, delay=1), 5).discover(0.6)
    assert sorted(nodes) == [0, 1, 2, 4]


def test_too_few_simulated_nodes_are_named_at_once_not_blamed_on_slow_actors(tiny_config):
    """3 nodes for 5 client ids: the error says so within the short grace, with both numbers and
    the fix, instead of waiting the whole discovery_timeout and advising to raise it."""
    from fedmaml.errors import MessageError
    from fedmaml.federated.client_app import make_client_app
    from fedmaml.federated.discovery import PartitionDirectory

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SERVER_NODE_ID
    app = make_client_app(tiny_config())
    directory = PartitionDirectory(UnknownNodesGrid(app, 3, delay=1), 5)
    start = time.monotonic()
    with pytest.raises(MessageError) as raised:
        directory.discover(300.0, simulation=True)
    assert time.monotonic() - start < 60.0
    message = str(raised.value)
    assert "3 nodes" in message and "5 client ids" in message, message
    assert "--num-supernodes 5" in message and "data.num_clients" in message, message
    assert "discovery_timeout" not in message, message


def test_a_deployment_with_too_few_supernodes_says_how_many(tiny_config, caplog):
    from fedmaml.federated.client_app import make_client_app
    from fedmaml.federated.discovery import PartitionDirectory

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SERVER_NODE_ID
    app = make_client_app(tiny_config())
    with caplog.at_level("WARNING", logger="fedmaml"):
        nodes = PartitionDirectory(UnknownNodesGrid(app, 3, delay=1), 5).discover(0.6)
    assert sorted(nodes) == [0, 1, 2]
    assert any("only 3 SuperNodes are connected for 5 client ids: start more SuperNodes"
               in r.getMessage() for r in caplog.records), caplog.text


def test_ray_address_empty_means_a_fresh_local_instance_and_an_unreachable_one_fails_fast(
        tiny_config):
    import socket

    from fedmaml.engines.ray_engine import check_reachable, ray_backend_config
    from fedmaml.errors import ConfigError

    assert ray_backend_config(tiny_config().engine)["init_args"]["address"] == "local"
    given = tiny_config("engine.ray_address=10.0.0.1:6379").engine
    assert ray_backend_config(given)["init_args"]["address"] == "10.0.0.1:6379"
    with socket.socket() as s:  # a port nobody listens on: bound, never accepting
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(ConfigError, match=rf"engine.ray_address: cannot reach 127.0.0.1:{port} "
                                              r"within 2s .*leave ray_address empty"):
            check_reachable(f"127.0.0.1:{port}", seconds=2.0)
        assert time.monotonic() - start < 60.0  # the 2 s given, not the OS's connect timeout
    with pytest.raises(ConfigError, match="is not host:port"):
        check_reachable("nowhere")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        check_reachable(f"ray://127.0.0.1:{s.getsockname()[1]}")  # accepts: fine
