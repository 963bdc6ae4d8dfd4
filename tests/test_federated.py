"""The federated layer end to end: the real ClientApp and ServerApp (MetaStrategy) exchanging real
Flower messages through the in-process engine, on seconds-scale configs (``tiny_config``).

What is checked: memories never leave their client; client sampling (count, fraction, by id,
seeded); every algorithm through the apps, and that MOML learns; determinism; failures, min_replies
and timeouts; evaluation groups and statistics; the run directory and the CLI.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmaml.config import dump_yaml, load_config
from fedmaml.core.server import ServerOptimizer, aggregate
from fedmaml.engines.inprocess import FIRST_CLIENT_NODE, InProcessGrid, run_inprocess
from fedmaml.experiment import run_experiment
from fedmaml.federated import records as R
from fedmaml.federated.client_app import make_client_app
from fedmaml.federated.memory_store import MEMORY_KEY
from fedmaml.federated.participation import sample_clients
from fedmaml.federated.server_app import make_server_app
from fedmaml.federated.setup import setup_for
from fedmaml.results.recorder import read_metrics, read_summary

REPO = Path(__file__).resolve().parents[1]
STATS = ("mean", "std", "p10", "p50", "p90")
TIMING_KEYS = ("seconds", "train_seconds_max")  # wall-clock fields: differ between identical runs


# -- harness ----------------------------------------------------------------------------------------

class RecordingGrid(InProcessGrid):
    """The in-process grid, keeping every instruction and every reply the server receives, and a
    snapshot of every node's memory after each exchange (what the clients held at that moment)."""

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        super().__init__(client_app, num_nodes)
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.memory_snapshots: list[dict[int, dict[str, torch.Tensor]]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.sent += messages
        self.replies += replies
        self.memory_snapshots.append({cid: memory for cid in range(self.num_nodes)
                                      if (memory := self.memory(cid)) is not None})
        return replies

    def memory(self, cid: int) -> dict[str, torch.Tensor] | None:
        ctx = self.contexts.get(cid + FIRST_CLIENT_NODE)
        record = None if ctx is None else ctx.state.array_records.get(MEMORY_KEY)
        return None if record is None else dict(record.to_torch_state_dict())

    def train_instructions(self) -> dict[int, list[Message]]:
        """Train messages by round."""
        out: dict[int, list[Message]] = {}
        for m in self.sent:
            if m.metadata.message_type == "train":
                out.setdefault(int(m.content[R.CONFIG][R.ROUND]), []).append(m)
        return out


def run_recorded(cfg, run_dir: Path, client_app: ClientApp | None = None
                 ) -> tuple[RecordingGrid, list[dict]]:
    """Run ``cfg`` on a :class:`RecordingGrid`; return the grid and the metrics.jsonl rows."""
    setup = setup_for(cfg)
    num_nodes = setup.federation.num_clients + setup.federation.num_unseen
    app = client_app or make_client_app(cfg)
    grid = RecordingGrid(app, num_nodes)
    run_inprocess(make_server_app(cfg, run_dir, quiet=True), app, num_nodes, grid)
    return grid, read_metrics(run_dir)


def injecting_app(cfg, *, fail=(), slow=(), slow_seconds=0.0, rounds=None) -> ClientApp:
    """A real ClientApp that runs fedmaml's own, except that train raises for client ids in
    ``fail`` and sleeps ``slow_seconds`` first for ids in ``slow`` (in ``rounds``, or always)."""
    inner = make_client_app(cfg)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cid = int(context.node_config[R.PARTITION])
        now = rounds is None or int(msg.content[R.CONFIG][R.ROUND]) in rounds
        if now and cid in fail:
            raise RuntimeError(f"injected failure on client {cid}")
        if now and cid in slow:
            time.sleep(slow_seconds)
        return inner(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return inner(msg, context)

    return app


def train_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["round"] > 0]


def params_of(msg: Message) -> dict[str, torch.Tensor]:
    return dict(msg.content[R.ARRAYS].to_torch_state_dict())


def same_params(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- 1. memory never leaves the client ---------------------------------------------------------------

def test_memories_never_reach_the_server(tiny_config, tmp_path):
    cfg = tiny_config("algorithm.name=moml", "algorithm.memory_policy=keep", "federated.rounds=4",
                      "federated.eval_every=1", "data.tasks_per_client=2")
    grid, rows = run_recorded(cfg, tmp_path / "run")
    tpc = cfg.data.tasks_per_client

    # Not vacuous: clients hold stacked memories, and a re-sampled client's memory moved.
    final = grid.memory_snapshots[-1]
    trained = {c for r in train_rows(rows) for c in r["clients"]}
    assert set(final) == trained
    assert all(v.shape[0] == tpc for m in final.values() for v in m.values())

    sent_by_id = {m.metadata.message_id: m for m in grid.sent}
    all_memories = [(cid, k, v[j]) for snap in grid.memory_snapshots for cid, mem in snap.items()
                    for k, v in mem.items() for j in range(v.shape[0])]
    checked = 0
    for reply in grid.replies:
        assert not reply.has_error(), reply.error.reason
        kind = reply.metadata.message_type
        content = reply.content
        if kind == "train":
            assert set(content.keys()) == {R.ARRAYS, R.METRICS}
            assert set(content.array_records) == {R.ARRAYS}
        else:
            assert kind == "evaluate"
            assert set(content.keys()) == {R.METRICS}
            assert not content.array_records
        assert not content.config_records
        # Metrics are plain numbers: no list (or anything else) could smuggle a tensor out.
        for key, value in content[R.METRICS].items():
            assert isinstance(value, (int, float)), (kind, key, type(value))
        if kind != "train":
            continue
        delta = params_of(reply)
        w_r = params_of(sent_by_id[reply.metadata.reply_to_message_id])
        for cid, k, memory in all_memories:
            # neither the update nor what the server can rebuild from it (w_r + delta) is a memory
            assert not torch.allclose(delta[k], memory, atol=1e-6, rtol=0), (cid, k)
            assert not torch.allclose(w_r[k] + delta[k], memory, atol=1e-6, rtol=0), (cid, k)
            checked += 1
    assert checked > 100


# -- 2. sampling --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampling, k", [("federated.clients_per_round=4", 4),
                                         ("federated.fraction=0.5", 3)])
def test_cross_device_samples_the_configured_clients_by_id(tiny_config, tmp_path, sampling, k):
    cfg = tiny_config("federated.clients_per_round=0", sampling, "federated.rounds=4",
                      "federated.eval_every=0")
    grid, rows = run_recorded(cfg, tmp_path / "run")
    instructions = grid.train_instructions()
    for row in train_rows(rows):
        clients = row["clients"]
        assert len(clients) == len(set(clients)) == k
        assert set(clients) <= set(range(cfg.data.num_clients))  # unseen clients never sampled
        assert clients == sample_clients(cfg.seed, row["round"], cfg.data.num_clients, k)
        # the messages went to exactly those clients' nodes
        nodes = sorted(m.metadata.dst_node_id - FIRST_CLIENT_NODE
                       for m in instructions[row["round"]])
        assert nodes == clients
    assert len({tuple(r["clients"]) for r in train_rows(rows)}) > 1  # not the same set every round


def test_sampling_is_reproducible_and_depends_on_the_seed(tiny_config, tmp_path):
    def clients(seed: int, run: str) -> list[list[int]]:
        cfg = tiny_config(f"seed={seed}", "federated.rounds=5", "federated.eval_every=0",
                          "federated.clients_per_round=2", "evaluation.steps=0")
        return [r["clients"] for r in train_rows(read_metrics(
            run_experiment(cfg, quiet=True, run_dir=tmp_path / run)))]

    first = clients(0, "a")
    assert clients(0, "b") == first
    assert clients(1, "c") != first


def test_cross_silo_trains_every_client_every_round(tiny_config, tmp_path):
    cfg = tiny_config("federated.mode=cross_silo", "federated.clients_per_round=0")
    _, rows = run_recorded(cfg, tmp_path / "run")
    assert [r["clients"] for r in train_rows(rows)] == [list(range(6))] * 3


def test_silo_keeps_one_memory_per_task_and_samples_b_tasks_per_step(tiny_config, tmp_path):
    T, B, H, K, Q, K0 = 3, 2, 2, 4, 3, 5
    cfg = tiny_config("federated.mode=cross_silo", "federated.clients_per_round=0",
                      "data.num_clients=2", "data.unseen_clients=1", f"data.tasks_per_client={T}",
                      f"algorithm.tasks_per_step={B}", f"algorithm.local_steps={H}",
                      f"algorithm.support_size={K}", f"algorithm.query_size={Q}",
                      f"algorithm.init_support_size={K0}", "federated.rounds=2")
    grid, _ = run_recorded(cfg, tmp_path / "run")
    like = setup_for(cfg).initial_params
    for cid in (0, 1):
        memory = grid.memory(cid)
        assert {k: tuple(v.shape) for k, v in memory.items()} == {
            k: (T, *v.shape) for k, v in like.items()}
    assert grid.memory(2) is None  # the unseen client
    samples = {}
    for reply in grid.replies:
        if reply.metadata.message_type == "train":
            m = reply.content[R.METRICS]
            samples.setdefault(int(m[R.PARTITION]), []).append(int(m["samples"]))
    # per round: H steps x B tasks x (K + Q) examples, plus K0 per task to initialise the memories
    assert samples == {c: [H * B * (K + Q) + T * K0, H * B * (K + Q)] for c in (0, 1)}


# -- 3. every algorithm through the apps --------------------------------------------------------------

ALGORITHM_CASES = {
    "moml-keep": ["algorithm.name=moml", "algorithm.memory_policy=keep"],
    "moml-reinit": ["algorithm.name=moml", "algorithm.memory_policy=reinit"],
    "moml-decay_to_w": ["algorithm.name=moml", "algorithm.memory_policy=decay_to_w",
                        "federated.mode=cross_silo", "data.num_clients=3",
                        "data.tasks_per_client=2"],
    "per_fedavg-fo": ["algorithm.name=per_fedavg", "algorithm.meta_gradient=first_order"],
    "per_fedavg-hf": ["algorithm.name=per_fedavg", "algorithm.meta_gradient=hessian_free"],
    "fedmeta-fo": ["algorithm.name=fedmeta", "algorithm.meta_gradient=first_order"],
    "fedmeta-so": ["algorithm.name=fedmeta", "algorithm.meta_gradient=second_order"],
    "reptile": ["algorithm.name=reptile"],
    "fedavg-finetune": ["algorithm.name=fedavg"],
}


@pytest.mark.parametrize("case", list(ALGORITHM_CASES))
def test_every_algorithm_runs_through_the_apps(tiny_config, tmp_path, case):
    # Two layer groups: the inner pattern adapts everything, then only the head; evaluation
    # fine-tunes the head only (FedAvg's personalization is exactly this fine-tuning).
    cfg = tiny_config(*ALGORITHM_CASES[case], "algorithm.inner_pattern=11|01",
                      "evaluation.pattern=head", "evaluation.steps=3", "federated.rounds=2",
                      "federated.eval_every=0", "federated.clients_per_round=0",
                      "federated.fraction=0.5", "algorithm.loss_before=true")
    run_dir = run_experiment(cfg, quiet=True, run_dir=tmp_path / "run")
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in train_rows(rows):
        assert row["failures"] == 0 and row["updated"] is True
        assert math.isfinite(row["loss_before"]) and math.isfinite(row["loss_after"])
    final = rows[-1]["eval"]
    assert final["eval-failures"] == 0
    for group in ("seen", "unseen"):
        assert math.isfinite(final[f"{group}.loss.mean"])
    memory_keys = [k for k in final if "memory-" in k]
    if cfg.algorithm.name == "moml":
        assert math.isfinite(final["seen.memory-loss.mean"])
        assert not any(k.startswith("unseen.") for k in memory_keys)
    else:
        assert memory_keys == []
    model = torch.load(run_dir / "model.pt", weights_only=True)
    assert not same_params(model, setup_for(cfg).initial_params)  # training moved w


@pytest.mark.slow
def test_moml_lowers_the_personalized_loss_on_sinusoid(tiny_config, tmp_path):
    # 40 rounds, 5 of 10 clients, 3 local steps, evaluation on the same panel before and after.
    # Measured ratios after/before with seeds 0, 1, 2: from w 0.76, 0.65, 0.74; from memory 0.65,
    # 0.49, 0.68; unseen clients 0.73, 0.54, 0.96. The run is deterministic (seed 0).
    cfg = tiny_config("data.num_clients=10", "data.unseen_clients=3", "data.eval_adapt_size=10",
                      "data.eval_heldout_size=100", "model.hidden=[40,40]",
                      "algorithm.support_size=5", "algorithm.eta=0.05", "algorithm.local_steps=3",
                      "federated.clients_per_round=5", "federated.rounds=40",
                      "federated.eval_every=0", "evaluation.steps=10")
    summary = read_summary(run_experiment(cfg, quiet=True, run_dir=tmp_path / "run"))
    before, after = summary["before"], summary["after"]
    assert after["seen.loss.mean"] < 0.85 * before["seen.loss.mean"]
    assert after["seen.memory-loss.mean"] < 0.75 * before["seen.loss.mean"]
    assert after["unseen.loss.mean"] < 0.85 * before["unseen.loss.mean"]


# -- 4. determinism -----------------------------------------------------------------------------------

def without_timing(row: dict) -> dict:
    out = {k: v for k, v in row.items() if k not in TIMING_KEYS}
    if "eval" in out:
        out["eval"] = {k: v for k, v in out["eval"].items() if ".adapt-ms." not in k}
    return out


def test_same_config_and_seed_give_identical_rows(tiny_config, tmp_path):
    cfg = tiny_config("federated.eval_every=1")
    a = run_experiment(cfg, quiet=True, run_dir=tmp_path / "a")
    b = run_experiment(cfg, quiet=True, run_dir=tmp_path / "b")
    rows_a, rows_b = read_metrics(a), read_metrics(b)
    assert len(rows_a) == 4
    assert [without_timing(r) for r in rows_a] == [without_timing(r) for r in rows_b]
    assert same_params(torch.load(a / "model.pt", weights_only=True),
                       torch.load(b / "model.pt", weights_only=True))


# -- 5. failures --------------------------------------------------------------------------------------

def test_client_errors_are_counted_logged_and_the_run_goes_on(tiny_config, tmp_path, caplog):
    cfg = tiny_config("federated.mode=cross_silo", "data.num_clients=4")
    app = injecting_app(cfg, fail={1, 3})
    with caplog.at_level(logging.WARNING, logger="fedmaml"):
        _, rows = run_recorded(cfg, tmp_path / "run", app)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for row in train_rows(rows):
        assert (row["failures"], row["replies"], row["updated"]) == (2, 2, True)
    assert "injected failure on client 1" in caplog.text
    assert "injected failure on client 3" in caplog.text
    assert read_summary(tmp_path / "run") is not None  # the run finished


def test_too_few_replies_leave_the_model_unchanged_that_round(tiny_config, tmp_path):
    cfg = tiny_config("federated.mode=cross_silo", "data.num_clients=4", "federated.min_replies=3")
    grid, rows = run_recorded(cfg, tmp_path / "run", injecting_app(cfg, fail={0, 1}, rounds={2}))
    by_round = {r["round"]: r for r in rows}
    assert (by_round[2]["failures"], by_round[2]["replies"], by_round[2]["updated"]) == (2, 2, False)
    assert by_round[1]["updated"] and by_round[3]["updated"]
    assert "loss_after" in by_round[2]  # the two clients that replied still report their work
    # w as broadcast at the start of each round: round 2 changed nothing, rounds 1 and 3 did
    w = {r: params_of(ms[0]) for r, ms in grid.train_instructions().items()}
    assert not same_params(w[1], w[2])
    assert same_params(w[2], w[3])
    final = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert not same_params(final, w[3])


def test_a_client_slower_than_the_round_timeout_is_dropped(tiny_config, tmp_path, caplog):
    # Round 1 runs normally (and warms up torch); in round 2 client 1 takes longer than the timeout.
    cfg = tiny_config("federated.mode=cross_silo", "data.num_clients=3",
                      "federated.round_timeout=2.0", "federated.eval_every=0")
    app = injecting_app(cfg, slow={1}, slow_seconds=2.5, rounds={2})
    with caplog.at_level(logging.WARNING, logger="fedmaml"):
        grid, rows = run_recorded(cfg, tmp_path / "run", app)
    row = {r["round"]: r for r in rows}[2]
    assert (row["failures"], row["replies"], row["updated"]) == (1, 2, True)
    assert "did not reply in time" in caplog.text
    round2 = [m for m in grid.replies if m.metadata.message_type == "train"
              and int(m.content[R.METRICS][R.PARTITION]) == 1]
    assert len(round2) == 2  # client 1's replies of rounds 1 and 3 only


def tampering_app(cfg, tamper) -> ClientApp:
    """A real ClientApp whose train replies pass through ``tamper(cid, tensors) -> tensors``: a
    misbehaving peer, in Flower's own record format."""
    inner = make_client_app(cfg)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = inner(msg, context)
        cid = int(context.node_config[R.PARTITION])
        tensors = tamper(cid, dict(reply.content[R.ARRAYS].to_torch_state_dict()))
        reply.content[R.ARRAYS] = ArrayRecord(torch_state_dict=tensors)
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return inner(msg, context)

    return app


def test_malformed_updates_are_rejected_by_name_and_the_rest_aggregated(tiny_config, tmp_path,
                                                                         caplog):
    cfg = tiny_config("federated.mode=cross_silo", "data.num_clients=6", "federated.eval_every=0")
    first = None

    def tamper(cid, t):
        if cid == 1:  # a NaN in the second tensor
            t[first[1]] = t[first[1]].clone().fill_(float("nan"))
        elif cid == 2:  # a tensor of the wrong shape, and an infinity
            t[first[0]] = t[first[0]][:1]
            t[first[1]] = t[first[1]].clone().fill_(float("inf"))
        elif cid == 3:  # a missing tensor
            del t[first[0]]
        return t

    first = list(setup_for(cfg).initial_params)
    with caplog.at_level(logging.WARNING, logger="fedmaml"):
        grid, rows = run_recorded(cfg, tmp_path / "run", tampering_app(cfg, tamper))
    for row in train_rows(rows):
        assert (row["failures"], row["replies"], row["updated"]) == (3, 3, True)
    assert f"update from client 1: parameter {first[1]!r} contains NaN or infinite values" in caplog.text
    assert f"update from client 2: parameter {first[0]!r} has shape [1, 1]" in caplog.text
    assert f"update from client 3: parameter names differ from the model's (missing ['{first[0]}']" in caplog.text
    # w moved by the mean of the good clients' updates only (plain SGD, server_lr 1), decoded and
    # averaged here independently of the strategy's stacked path
    w = {r: params_of(ms[0]) for r, ms in grid.train_instructions().items()}
    replies = [m for m in grid.replies if m.metadata.message_type == "train"]
    for r in (1, 2):
        good = [m for m in replies if int(m.metadata.group_id) == r
                and int(m.content[R.METRICS][R.PARTITION]) in (0, 4, 5)]
        deltas = [params_of(m) for m in good]
        counts = [int(m.content[R.METRICS][R.NUM_EXAMPLES]) for m in good]
        want = ServerOptimizer("sgd", 1.0).step(w[r], aggregate(deltas, counts, "weighted"))
        for k in want:
            assert torch.allclose(w[r + 1][k], want[k], atol=1e-7), k


class MeddlingGrid(RecordingGrid):
    """Adds to each round's train replies what a faulty transport or peer could: a copy of the first
    reply with a bad example count placed before it, a duplicate of the second, and a copy of the
    third claiming to come from a client that was not sampled."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        if not messages or messages[0].metadata.message_type != "train":
            return replies
        by_id = {m.metadata.message_id: m for m in messages}
        sampled = {int(r.content[R.METRICS][R.PARTITION]) for r in replies}
        outsider = min(set(range(self.num_nodes)) - sampled)

        def variant(reply, **changes):
            metrics = {**dict(reply.content[R.METRICS]), **changes}
            return Message(RecordDict({R.ARRAYS: reply.content[R.ARRAYS],
                                       R.METRICS: MetricRecord(metrics)}),
                           reply_to=by_id[reply.metadata.reply_to_message_id])

        return [variant(replies[0], **{R.NUM_EXAMPLES: 0}), *replies, replies[1],
                variant(replies[2], **{R.PARTITION: outsider})]


def test_bad_duplicate_and_unsampled_replies_are_counted_and_the_sampled_ones_used(tiny_config,
                                                                                   tmp_path, caplog):
    cfg = tiny_config("federated.eval_every=0")  # 3 of 6 clients per round
    setup = setup_for(cfg)
    num_nodes = setup.federation.num_clients + setup.federation.num_unseen
    app = make_client_app(cfg)
    grid = MeddlingGrid(app, num_nodes)
    with caplog.at_level(logging.WARNING, logger="fedmaml"):
        run_inprocess(make_server_app(cfg, tmp_path / "run", quiet=True), app, num_nodes, grid)
    for row in train_rows(read_metrics(tmp_path / "run")):
        assert (row["failures"], row["replies"], row["updated"]) == (3, 3, True)
    assert "reported 0 examples" in caplog.text
    assert "not sampled, or a duplicate" in caplog.text
    w = {r: params_of(ms[0]) for r, ms in grid.train_instructions().items()}
    for r in (1, 2):  # the three sampled clients' own replies, each once
        good = [m for m in grid.replies if m.metadata.message_type == "train"
                and int(m.metadata.group_id) == r]
        assert len(good) == 3
        want = ServerOptimizer("sgd", 1.0).step(w[r], aggregate(
            [params_of(m) for m in good], [int(m.content[R.METRICS][R.NUM_EXAMPLES]) for m in good],
            "weighted"))
        for k in want:
            assert torch.allclose(w[r + 1][k], want[k], atol=1e-7), k


# -- 6. evaluation ------------------------------------------------------------------------------------

def test_evaluation_rounds_groups_and_statistics(tiny_config, tmp_path):
    cfg = tiny_config("algorithm.name=moml", "federated.rounds=5", "federated.eval_every=2",
                      "federated.clients_per_round=1")
    grid, rows = run_recorded(cfg, tmp_path / "run")
    evals = {r["round"]: r["eval"] for r in rows if "eval" in r}
    assert sorted(evals) == [0, 2, 4, 5]
    trained = {c for r in train_rows(rows) for c in r["clients"]}
    assert trained < set(range(6))  # 5 rounds x 1 client: someone in the panel never trained
    for rnd, ev in evals.items():
        assert ev["eval-failures"] == 0
        assert ev["seen.ids"] == list(range(6)) and ev["unseen.ids"] == [6, 7]
        for group, n in (("seen", 6), ("unseen", 2)):
            for metric in ("loss", "adapt-ms"):
                for stat in STATS:
                    assert math.isfinite(ev[f"{group}.{metric}.{stat}"])
                values = ev[f"{group}.{metric}.clients"]
                assert len(values) == n
                assert ev[f"{group}.{metric}.p10"] <= ev[f"{group}.{metric}.p50"] \
                    <= ev[f"{group}.{metric}.p90"]
        assert not any(k.startswith("unseen.memory-") for k in ev)
        if rnd == 0:
            assert not any("memory-" in k for k in ev)  # nobody has a memory before training
    final = evals[5]
    memory = final["seen.memory-loss.clients"]  # null for the panel clients that never trained
    assert [v is not None for v in memory] == [c in trained for c in range(6)]
    have = [v for v in memory if v is not None]
    assert min(have) <= final["seen.memory-loss.mean"] <= max(have)
    # unseen clients never train and never get a memory
    train_nodes = {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"}
    assert all(n - FIRST_CLIENT_NODE < 6 for n in train_nodes)
    assert grid.memory(6) is None and grid.memory(7) is None


def test_evaluation_panel_is_fixed_and_memory_metrics_can_be_turned_off(tiny_config, tmp_path):
    cfg = tiny_config("federated.eval_clients=3", "federated.eval_every=1",
                      "evaluation.from_memory=false")
    _, rows = run_recorded(cfg, tmp_path / "run")
    panels = {tuple(r["eval"]["seen.ids"]) for r in rows}
    assert len(panels) == 1 and len(next(iter(panels))) == 3  # the same 3 clients every time
    assert not any("memory-" in k for r in rows for k in r["eval"])


def test_non_memory_algorithm_reports_no_memory_metrics(tiny_config, tmp_path):
    cfg = tiny_config("algorithm.name=per_fedavg", "federated.eval_every=1")
    _, rows = run_recorded(cfg, tmp_path / "run")
    assert not any("memory-" in k for r in rows for k in r["eval"])


# -- 8. run directory and CLI ------------------------------------------------------------------------

def test_run_directory_contents(tiny_config, tmp_path):
    cfg = tiny_config("algorithm.loss_before=true")
    run_dir = run_experiment(cfg, quiet=True, run_dir=tmp_path / "run")
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "metrics.jsonl", "summary.json",
                                                   "model.pt", "convergence.png"}
    assert load_config(run_dir / "config.yaml") == cfg
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    always = {"round", "bytes_up", "bytes_down", "samples", "seconds"}
    training = always | {"clients", "failures", "loss_before", "loss_after"}
    assert set(rows[0]) >= always | {"eval"}
    for row in train_rows(rows):
        assert set(row) >= training
    # Running totals. Bytes: each round sends w to 3 clients and gets 3 updates back (float32
    # arrays, plus a little metadata). Samples: K + Q = 8 per client and round, plus K0 = 4 to
    # initialise the memory of a client at its first participation (memory_policy keep).
    n_bytes = 4 * sum(v.numel() for v in setup_for(cfg).initial_params.values())
    participated: set[int] = set()
    samples = 0
    for i, row in enumerate(rows):
        assert 3 * n_bytes * i <= row["bytes_down"] < 3 * (n_bytes + 1000) * i + 1
        assert 3 * n_bytes * i <= row["bytes_up"] < 3 * (n_bytes + 1000) * i + 1
        if i:
            samples += 3 * 8 + 4 * len(set(row["clients"]) - participated)
            participated |= set(row["clients"])
        assert row["samples"] == samples
    assert {r["round"] for r in rows if "eval" in r} == {0, 2, 3}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["algorithm"] == "moml"
    assert summary["before"]["seen.loss.mean"] == rows[0]["eval"]["seen.loss.mean"]
    assert summary["after"]["seen.loss.mean"] == rows[-1]["eval"]["seen.loss.mean"]
    model = torch.load(run_dir / "model.pt", weights_only=True)
    assert {k: v.shape for k, v in model.items()} == {
        k: v.shape for k, v in setup_for(cfg).initial_params.items()}
    assert (run_dir / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "fedmaml", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_run_quiet_prints_only_where_the_run_went(tiny_config, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_yaml(tiny_config()))
    for run_dir in ("tiny", "tiny-2"):  # a repeated run goes to a suffixed directory: say which
        done = cli("run", str(config), "--quiet", f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert (done.stdout, done.stderr) == (f"{tmp_path / 'out' / run_dir}\n", "")
        assert (tmp_path / "out" / run_dir / "summary.json").exists()


def test_cli_run_with_a_bad_key_exits_2_with_a_clear_message(tiny_config, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_yaml(tiny_config()))
    done = cli("run", str(config), "federated.rounds_=5", cwd=tmp_path)
    assert done.returncode == 2
    assert "federated.rounds_: unknown key; did you mean 'rounds'?" in done.stderr
    assert "Traceback" not in done.stderr


def test_model_init_seed_fixes_the_initial_model_across_run_seeds(tiny_config):
    """``model.init_seed`` (the MOML public code starts every seed from one model); -1 = the seed."""
    def initial(*overrides):
        return setup_for(tiny_config(*overrides)).initial_params

    fixed_1, fixed_2 = initial("seed=1", "model.init_seed=1234"), initial("seed=2", "model.init_seed=1234")
    own_1, own_2 = initial("seed=1"), initial("seed=2")
    assert all(torch.equal(fixed_1[k], fixed_2[k]) for k in fixed_1)
    assert not all(torch.equal(own_1[k], own_2[k]) for k in own_1)
    model = setup_for(tiny_config()).model
    assert all(torch.equal(own_1[k], model.init(1)[k]) for k in own_1)
    assert all(torch.equal(fixed_1[k], model.init(1234)[k]) for k in fixed_1)


def test_mlp_init_seed_1234_is_the_moml_public_codes_initial_model():
    """The public code builds its 1-40-40-1 model after ``torch.manual_seed(1234)`` with PyTorch's
    default ``nn.Linear`` initialisation; ``model.init_seed: 1234`` must give those very weights."""
    from fedmaml.models import mlp

    torch.manual_seed(1234)
    public = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40),
                                 torch.nn.ReLU(), torch.nn.Linear(40, 1))
    ours = mlp((1,), [40, 40], 1).init(1234)
    assert len(ours) == len(public.state_dict())
    for mine, theirs in zip(ours.values(), public.state_dict().values()):
        assert torch.equal(mine, theirs)
