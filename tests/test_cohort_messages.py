"""Cohort messages (the vectorized engine): one train message for a round's cohort and one reply with
the stacked updates. The strategy turns a cohort reply into the same per-client outcomes as
per-client replies: the same updated model, the same counts of replies and failures (a client that
raised, a non-finite update, an unreadable reply), the same bytes."""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmaml.engines.vectorized import VectorizedGrid
from fedmaml.federated import codec
from fedmaml.federated import records as R
from fedmaml.federated.client_app import make_client_app
from fedmaml.federated.setup import setup_for
from fedmaml.federated.strategy import MetaStrategy


class Fault(RuntimeError):
    """A client failure that names its kind (as a fault injector would)."""

    kind = "timeout"


def failing_setup(cfg, failing: dict[int, Exception]):
    """``cfg``'s setup, except that the clients in ``failing`` raise when asked for their tasks."""
    setup = setup_for(cfg)
    fed = setup.federation
    real = fed.client_tasks

    def tasks(cid):
        if cid in failing:
            raise failing[cid]
        return real(cid)

    return dataclasses.replace(setup, federation=dataclasses.replace(
        fed, _client_tasks=tasks, _unseen_tasks=fed._unseen_tasks, _many_client_tasks=None))


def one_round(cfg, setup, cohorts: bool, tamper=None):
    """Round 1 of a strategy on a vectorized grid: cohort messages or per-client messages."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    grid = VectorizedGrid(cfg, make_client_app(cfg), setup.federation.num_clients)
    grid.setup = setup
    strategy = MetaStrategy(setup)
    strategy.nodes = grid.partition_nodes()
    arrays = R.to_record(strategy.w)
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid if cohorts else None))
    assert len(messages) == (1 if cohorts else len(strategy.round_stats["clients"]))
    replies = list(grid.send_and_receive(messages))
    if tamper:
        replies = [tamper(r) for r in replies]
    down = sum(R.instruction_bytes(m) for m in messages)
    up = sum(R.reply_bytes(m, strategy.w) for m in replies)
    new, metrics = strategy.aggregate_train(1, replies)
    return strategy, new, metrics, (down, up)


def kinds(strategy) -> dict[str, int]:
    """The round's failures by kind (health.round_outcome), those that happened; ``rejected``
    counts non-finite updates apart."""
    stats = strategy.round_stats
    counted = {k: n for k, n in stats["failures_by_kind"].items() if n}
    return {**counted, **({"rejected": stats["rejected"]} if stats["rejected"] else {})}


def assert_same_outcome(a, b):
    (sa, new_a, ma, bytes_a), (sb, new_b, mb, bytes_b) = a, b
    assert kinds(sa) == kinds(sb)
    for key in ("replies", "failures", "updated"):
        assert sa.round_stats[key] == sb.round_stats[key], key
    assert bytes_a == bytes_b
    assert (new_a is None) == (new_b is None)
    for k in sa.w:
        assert torch.allclose(sa.w[k], sb.w[k], atol=1e-7), k
    if ma is not None:
        for k in ma:
            if k != "train-seconds-max":
                assert ma[k] == pytest.approx(mb[k], rel=1e-5), k


def test_a_cohort_round_equals_the_per_client_round(tiny_config):
    cfg = tiny_config("algorithm.name=moml", "federated.clients_per_round=5")
    setup = setup_for(cfg)
    cohort = one_round(cfg, setup, cohorts=True)
    assert_same_outcome(cohort, one_round(cfg, setup, cohorts=False))
    assert cohort[0].round_stats["replies"] == 5 and cohort[0].round_stats["failures"] == 0


def test_clients_that_raise_are_left_out_and_counted_by_kind(tiny_config, caplog):
    cfg = tiny_config("algorithm.name=moml", "federated.clients_per_round=6")
    setup = failing_setup(cfg, {1: ValueError("broken data file"), 4: Fault("injected delay")})
    with caplog.at_level(logging.WARNING, logger="fedmaml"):
        cohort = one_round(cfg, setup, cohorts=True)
    stats = cohort[0].round_stats
    assert (stats["replies"], stats["failures"], stats["updated"]) == (4, 2, True)
    assert kinds(cohort[0]) == {"error": 1, "timeout": 1}
    assert "client error: client 1: ValueError: broken data file" in caplog.text
    assert cohort[0].trained == {0, 2, 3, 5}
    per_client = one_round(cfg, setup, cohorts=False)
    # per-client error replies carry no kind: both are errors there
    assert kinds(per_client[0]) == {"error": 2}
    per_client[0].round_stats["failures_by_kind"] = stats["failures_by_kind"]
    assert_same_outcome(cohort, per_client)


def nan_row(row: int):
    """Tamper with a cohort reply: row ``row`` of the first parameter becomes NaN."""
    def tamper(reply: Message) -> Message:
        tensors = codec.decode(reply.content[R.ARRAYS])
        first = next(iter(tensors))
        tensors[first][row] = float("nan")
        reply.content[R.ARRAYS] = codec.encode(tensors)
        return reply
    return tamper


def test_a_non_finite_row_is_rejected_and_the_rest_averaged(tiny_config, caplog):
    cfg = tiny_config("algorithm.name=moml", "federated.clients_per_round=4")
    setup = setup_for(cfg)
    with caplog.at_level(logging.WARNING, logger="fedmaml"):
        strategy, new, metrics, _ = one_round(cfg, setup, cohorts=True, tamper=nan_row(2))
    cids = strategy.round_stats["clients"]
    assert (strategy.round_stats["replies"], strategy.round_stats["failures"]) == (3, 1)
    assert kinds(strategy) == {"rejected": 1}  # well-formed but not finite: counted apart
    assert f"update from client {cids[2]}: parameter" in caplog.text
    assert cids[2] not in strategy.trained
    # the same three clients alone give the same model
    others = [c for c in cids if c != cids[2]]
    alone = MetaStrategy(setup)
    alone.round_stats = {"clients": others}
    grid = VectorizedGrid(cfg, make_client_app(cfg), setup.federation.num_clients)
    content = RecordDict({R.ARRAYS: R.to_record(alone.w), R.CONFIG: ConfigRecord(
        {R.ROUND: 1, R.ETA: setup.eta_for_round(1), R.COHORT: others})})
    alone.aggregate_train(1, grid.send_and_receive([Message(content, 2, "train", group_id="1")]))
    for k in alone.w:
        assert torch.allclose(alone.w[k], strategy.w[k], atol=1e-7), k
    assert strategy.w is not None and new is not None and metrics["samples"] > 0


def test_an_unreadable_cohort_reply_or_a_failed_cohort_fails_all_its_clients(tiny_config, caplog):
    cfg = tiny_config("algorithm.name=moml", "federated.clients_per_round=3")
    setup = setup_for(cfg)

    def drop_metrics(reply):
        del reply.content[R.METRICS]
        return reply

    with caplog.at_level(logging.WARNING, logger="fedmaml"):
        strategy, new, metrics, _ = one_round(cfg, setup, cohorts=True, tamper=drop_metrics)
    assert (strategy.round_stats["replies"], strategy.round_stats["failures"]) == (0, 3)
    assert kinds(strategy) == {"malformed": 3}
    assert new is None and metrics is None and "malformed reply" in caplog.text

    # an instruction that cannot be decoded: the grid answers with an error for the whole cohort
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    grid = VectorizedGrid(cfg, make_client_app(cfg), setup.federation.num_clients)
    strategy = MetaStrategy(setup)
    strategy.nodes = grid.partition_nodes()
    [msg] = strategy.configure_train(1, R.to_record({"w": torch.zeros(2)}), ConfigRecord(), grid)
    replies = list(grid.send_and_receive([msg]))
    assert replies[0].has_error()
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert kinds(strategy) == {"error": 3}
    assert strategy.round_stats["failures"] == 3


def text_loss(cid: int):
    """Tamper with train replies: client ``cid``'s ``loss-after`` becomes text, which a peer's
    ConfigRecord can carry where a MetricRecord would not (a cohort reply's column as text)."""
    def tamper(reply: Message) -> Message:
        metrics = dict(reply.content[R.METRICS])
        ids = metrics[R.PARTITION]
        if isinstance(ids, list) and cid in ids:
            metrics["loss-after"] = ["a loss" if c == cid else str(v)
                                     for c, v in zip(ids, metrics["loss-after"])]
        elif ids == cid:
            metrics["loss-after"] = "a loss"
        else:
            return reply
        reply.content[R.METRICS] = ConfigRecord(metrics)
        return reply
    return tamper


def test_a_metric_that_is_not_a_number_fails_its_client_alone(tiny_config, caplog):
    """As a per-client reply whose loss is not a number: that client is malformed, the round goes
    on with the others (the numbers the server reads are checked once, for both paths)."""
    cfg = tiny_config("algorithm.name=moml", "federated.clients_per_round=4")
    setup = setup_for(cfg)
    cid = sorted(MetaStrategy(setup).cohort_of(1))[1]
    with caplog.at_level(logging.WARNING, logger="fedmaml"):
        cohort = one_round(cfg, setup, cohorts=True, tamper=text_loss(cid))
    strategy, new, metrics, _ = cohort
    assert (strategy.round_stats["replies"], strategy.round_stats["failures"]) == (3, 1)
    assert kinds(strategy) == {"malformed": 1} and cid not in strategy.trained
    assert "malformed reply: could not convert string to float: 'a loss'" in caplog.text
    assert new is not None and metrics["samples"] > 0
    assert_same_outcome(cohort, one_round(cfg, setup, cohorts=False, tamper=text_loss(cid)))


def test_bank_on_cuda_when_available():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    from fedmaml.engines.memory_bank import MemoryBank

    bank = MemoryBank({"w": torch.zeros(3)}, 10, device="cuda")
    bank.write([4, 7], {"w": torch.arange(12.0).reshape(2, 2, 3)})
    assert bank.read([7])["w"].device.type == "cuda"
    assert torch.equal(bank.read([7])["w"].cpu(), torch.arange(6.0, 12.0).reshape(1, 2, 3))


# -- evaluation rounds --------------------------------------------------------------------------

def evaluated(cfg, setup, cohorts: bool, tamper=None):
    """Round 1 trained with a cohort message (some clients then hold memories, the others none),
    then evaluated with one cohort message or per-client messages: (strategy, eval metrics,
    number of evaluate messages, grid)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    grid = VectorizedGrid(cfg, make_client_app(cfg), setup.federation.num_clients
                          + setup.federation.num_unseen)
    grid.setup = setup
    strategy = MetaStrategy(setup)
    strategy.nodes = grid.partition_nodes()
    strategy.aggregate_train(1, grid.send_and_receive(
        strategy.configure_train(1, R.to_record(strategy.w), ConfigRecord(), grid)))
    messages = list(strategy.configure_evaluate(cfg.federated.rounds, R.to_record(strategy.w),
                                                ConfigRecord(), grid if cohorts else None))
    replies = list(grid.send_and_receive(messages))
    if tamper:
        replies = [tamper(r) for r in replies]
    return strategy, strategy.aggregate_evaluate(cfg.federated.rounds, replies), len(messages), grid


def without_timing(metrics) -> str:
    """The evaluation's record without its timing, as JSON (NaN, for clients without a memory,
    compares equal there)."""
    return json.dumps({k: v for k, v in dict(metrics).items() if ".adapt-ms." not in k},
                      sort_keys=True)


def test_a_cohort_evaluation_equals_per_client_evaluations(tiny_config):
    cfg = tiny_config("algorithm.name=moml", "evaluation.tracking_error=true")
    setup = setup_for(cfg)
    strategy, cohort, sent, grid = evaluated(cfg, setup, cohorts=True)
    panel = strategy.round_stats["eval-clients"]
    assert sent == 1 and grid.stats.eval_cohorts == 1 and len(panel) == 8
    _, per_client, sent, grid = evaluated(cfg, setup, cohorts=False)
    assert sent == len(panel) and grid.stats.eval_cohorts == 0
    assert without_timing(cohort) == without_timing(per_client)
    assert cohort["eval-failures"] == 0
    assert cohort["seen.ids"] == list(range(6)) and cohort["unseen.ids"] == [6, 7]
    # clients without a memory have no memory metrics (NaN in the lists), the trained ones have
    memory_loss = cohort["seen.memory-loss.clients"]
    trained = sorted(strategy.trained)
    assert len(trained) == 3
    assert [c for c, v in enumerate(memory_loss) if not math.isnan(v)] == trained
    assert not any(k.startswith("unseen.memory-") for k in cohort)


def test_an_evaluation_that_raises_is_counted_in_eval_failures(tiny_config, caplog):
    cfg = tiny_config("algorithm.name=moml")
    setup = failing_setup(cfg, {2: ValueError("broken data file")})
    with caplog.at_level(logging.WARNING, logger="fedmaml"):
        _, cohort, _, _ = evaluated(cfg, setup, cohorts=True)
    assert cohort["eval-failures"] == 1
    assert cohort["seen.ids"] == [0, 1, 3, 4, 5] and cohort["unseen.ids"] == [6, 7]
    assert "evaluation error: client 2: ValueError: broken data file" in caplog.text
    _, per_client, _, _ = evaluated(cfg, setup, cohorts=False)
    assert without_timing(cohort) == without_timing(per_client)


def test_an_unreadable_cohort_evaluation_reply_fails_all_its_clients(tiny_config, caplog):
    cfg = tiny_config("algorithm.name=moml")
    setup = setup_for(cfg)

    def short_list(reply):  # one client's loss missing: the lists no longer line up
        metrics = reply.content[R.METRICS]
        metrics["loss"] = list(metrics["loss"])[1:]
        return reply

    with caplog.at_level(logging.WARNING, logger="fedmaml"):
        _, out, _, _ = evaluated(cfg, setup, cohorts=True, tamper=short_list)
    assert out["eval-failures"] == 8 and "seen.ids" not in out and "unseen.ids" not in out
    assert "malformed evaluation reply" in caplog.text

    # an instruction that cannot be decoded: the grid answers with an error for the whole panel
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    grid = VectorizedGrid(cfg, make_client_app(cfg), 8)
    strategy = MetaStrategy(setup)
    strategy.nodes = grid.partition_nodes()
    [msg] = strategy.configure_evaluate(0, R.to_record({"w": torch.zeros(2)}), ConfigRecord(), grid)
    replies = list(grid.send_and_receive([msg]))
    assert replies[0].has_error()
    assert strategy.aggregate_evaluate(0, replies)["eval-failures"] == 8
