"""Injected client faults (faults.*): a pure decision per (seed, client, round), applied by the
ClientApp and by the vectorized engine; the server counts exactly what was injected and averages
only the updates that arrived in time."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Message

from fedmaml.config import ConfigError, replace_path
from fedmaml.core.server import ServerOptimizer, aggregate
from fedmaml.engines.inprocess import InProcessGrid, run_inprocess
from fedmaml.experiment import run_experiment
from fedmaml.federated import faults
from fedmaml.federated import records as R
from fedmaml.federated.client_app import make_client_app
from fedmaml.federated.server_app import make_server_app
from fedmaml.federated.setup import setup_for
from fedmaml.results.recorder import read_metrics, read_summary

FAULTY = ("data.num_clients=20", "federated.clients_per_round=10", "federated.rounds=6",
          "federated.eval_every=0", "federated.round_timeout=60", "faults.fail=0.2",
          "faults.straggle=0.1")


def test_the_decision_is_a_pure_function_of_seed_client_and_round(tiny_config):
    cfg = tiny_config("federated.round_timeout=10", "faults.fail=0.2", "faults.straggle=0.1",
                      "faults.dropout=0.05")
    draws = [faults.client_fault(cfg, c, r) for c in range(200) for r in range(1, 51)]
    assert draws == [faults.client_fault(cfg, c, r) for c in range(200) for r in range(1, 51)]
    n = len(draws)
    for kind, rate in (("fail", 0.2), ("straggle", 0.1), ("dropout", 0.05)):
        assert abs(draws.count(kind) / n - rate) < 0.01, kind  # 10,000 draws: std < 0.004
    other_seed = replace_path(cfg, "seed", 1)
    assert draws != [faults.client_fault(other_seed, c, r) for c in range(200) for r in range(1, 51)]
    assert faults.client_fault(tiny_config(), 3, 1) is None  # off by default


def test_late_faults_need_a_round_timeout_and_rates_add_up_to_at_most_one(tiny_config):
    with pytest.raises(ConfigError, match=r"faults.straggle: late clients need a deadline; set "
                                          r"federated.round_timeout > 0"):
        tiny_config("faults.straggle=0.1")
    with pytest.raises(ConfigError, match=r"faults: fail \+ straggle \+ dropout = 1.2 exceeds 1"):
        tiny_config("federated.round_timeout=5", "faults.fail=0.6", "faults.dropout=0.6")


class KeepingGrid(InProcessGrid):
    """The in-process grid, keeping every train instruction and every train reply."""

    def __init__(self, client_app, num_nodes):
        super().__init__(client_app, num_nodes)
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.sent += [m for m in messages if m.metadata.message_type == "train"]
        self.replies += [m for m in replies if not m.has_error() and R.ARRAYS in m.content]
        return replies


def check_counts(cfg, run_dir) -> dict[str, int]:
    """Every row's counted failures equal the injected ones; returns the injected totals."""
    total = {k: 0 for k in faults.KINDS}
    for row in read_metrics(run_dir)[1:]:
        want = faults.injected(cfg, row["clients"], row["round"])
        assert row["injected"] == want
        assert row["failures_by_kind"] == {"error": want["fail"],
                                           "timeout": want["straggle"] + want["dropout"],
                                           "malformed": 0}, row["round"]
        assert row["replies"] == len(row["clients"]) - sum(want.values())
        for k in total:
            total[k] += want[k]
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["injected"] == total
    assert summary["failures"] == {"error": total["fail"],
                                   "timeout": total["straggle"] + total["dropout"], "malformed": 0}
    return total


def test_inprocess_counts_the_injected_faults_and_averages_only_the_updates_in_time(tiny_config,
                                                                                    tmp_path):
    cfg = tiny_config(*FAULTY, "faults.dropout=0.1")
    setup = setup_for(cfg)
    num_nodes = setup.federation.num_clients + setup.federation.num_unseen
    app = make_client_app(cfg)
    grid = KeepingGrid(app, num_nodes)
    run_inprocess(make_server_app(cfg, tmp_path / "run", quiet=True), app, num_nodes, grid)
    total = check_counts(cfg, tmp_path / "run")
    assert total["fail"] >= 5 and total["straggle"] >= 2 and total["dropout"] >= 2  # 60 draws
    # w_{r+1} = w_r + weighted mean of the updates of clients without a fault, and of no other
    w = {int(m.content[R.CONFIG][R.ROUND]): dict(m.content[R.ARRAYS].to_torch_state_dict())
         for m in grid.sent}
    for r in range(1, 6):
        ok = [m for m in grid.replies if int(m.metadata.group_id) == r
              and faults.client_fault(cfg, int(m.content[R.METRICS][R.PARTITION]), r) is None]
        assert len(ok) == read_metrics(tmp_path / "run")[r]["replies"]
        want = ServerOptimizer("sgd", 1.0).step(w[r], aggregate(
            [dict(m.content[R.ARRAYS].to_torch_state_dict()) for m in ok],
            [int(m.content[R.METRICS][R.NUM_EXAMPLES]) for m in ok], "weighted"))
        for k in want:
            assert torch.allclose(w[r + 1][k], want[k], atol=1e-7), (r, k)


def test_vectorized_counts_the_injected_faults_and_stragglers_still_train(tiny_config, tmp_path):
    from fedmaml.engines.vectorized import run_vectorized

    cfg = tiny_config(*FAULTY, "faults.dropout=0.1", "engine.name=vectorized")
    setup = setup_for(cfg)
    num_nodes = setup.federation.num_clients + setup.federation.num_unseen
    grid = run_vectorized(make_server_app(cfg, tmp_path / "run", quiet=True),
                          make_client_app(cfg), num_nodes, cfg)
    try:
        check_counts(cfg, tmp_path / "run")
        # A client's memory exists iff it trained at least once: straggling counts (the work was
        # done, only the reply was late), failing and dropping out do not.
        worked = {c for row in read_metrics(tmp_path / "run")[1:] for c in row["clients"]
                  if faults.client_fault(cfg, c, row["round"]) in (None, "straggle")}
        has = grid.bank.contains(list(range(20))).tolist()
        assert {c for c in range(20) if has[c]} == worked
    finally:
        grid.close()


def test_the_engines_agree_on_a_faulty_run(tiny_config, tmp_path):
    cfg = tiny_config(*FAULTY)
    a = run_experiment(cfg, quiet=True, run_dir=tmp_path / "inprocess")
    b = run_experiment(replace_path(cfg, "engine.name", "vectorized"), quiet=True,
                       run_dir=tmp_path / "vectorized")
    check_counts(cfg, b)
    keys = ("clients", "replies", "failures", "failures_by_kind", "injected")
    assert ([{k: r.get(k) for k in keys} for r in read_metrics(a)]
            == [{k: r.get(k) for k in keys} for r in read_metrics(b)])


def _fedmaml_records(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fedmaml" and r.levelno == level]


@pytest.mark.parametrize("engine", ["inprocess", "vectorized"])
def test_injected_faults_are_logged_below_warning(tiny_config, tmp_path, caplog, engine):
    # Injected on purpose, they are expected: counted in the rows and the summary, logged at INFO
    # (no line under --quiet, which shows warnings), one line per injected failure or straggler.
    import logging

    cfg = tiny_config(*FAULTY, "faults.dropout=0.1", f"engine.name={engine}")
    caplog.set_level(logging.INFO, logger="fedmaml")
    run_dir = run_experiment(cfg, quiet=True, run_dir=tmp_path / "run")
    total = check_counts(cfg, run_dir)
    assert _fedmaml_records(caplog, logging.WARNING) == []
    info = [m for m in _fedmaml_records(caplog, logging.INFO) if "faults." in m]
    assert sum(m.count("(faults.fail)") for m in info) == total["fail"]
    late = total["straggle"] + total["dropout"]
    if engine == "vectorized":  # one line per late client, naming its fault
        assert sum(("(faults.straggle)" in m) + ("(faults.dropout)" in m) for m in info) == late
    else:  # the server sees late replies as missing: one line per round, with the count
        counted = [int(m.split(": ")[1].split()[0]) for m in info if "did not reply in time" in m]
        assert sum(counted) == late


def test_a_real_client_error_still_warns_beside_injected_faults(tiny_config, tmp_path, caplog):
    import logging

    from flwr.app import Context
    from flwr.clientapp import ClientApp

    cfg = tiny_config(*FAULTY)
    inner = make_client_app(cfg)
    app = ClientApp()
    broken: list[int] = []  # the first client without an injected fault asked in round 2

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        cid = int(context.node_config["partition-id"])
        if (int(msg.content[R.CONFIG][R.ROUND]) == 2 and not broken
                and faults.client_fault(cfg, cid, 2) is None):
            broken.append(cid)
            raise OSError(f"disk full on client {cid}")
        return inner(msg, context)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return inner(msg, context)

    setup = setup_for(cfg)
    num_nodes = setup.federation.num_clients + setup.federation.num_unseen
    caplog.set_level(logging.INFO, logger="fedmaml")
    run_inprocess(make_server_app(cfg, tmp_path / "run", quiet=True), app, num_nodes,
                  InProcessGrid(app, num_nodes))
    assert _fedmaml_records(caplog, logging.WARNING) == [
        f"round 2: client error: OSError: disk full on client {broken[0]}"]
    assert any("InjectedFault" in m for m in _fedmaml_records(caplog, logging.INFO))


@pytest.mark.slow
def test_a_quiet_cli_run_with_injected_faults_prints_only_where_it_went(tiny_config, tmp_path):
    from fedmaml.config import dump_yaml
    from test_federated import cli

    config = tmp_path / "faulty.yaml"
    config.write_text(dump_yaml(tiny_config(*FAULTY, "engine.name=vectorized")))
    done = cli("run", str(config), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert read_summary(done.stdout.strip())["failures"]["error"] > 0
