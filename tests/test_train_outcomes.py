"""A round's train outcomes as columns (fedmaml/federated/train_outcomes.py): cohort replies (rows or
part sums) and per-client replies accounted by one function, with the rules and messages of the
per-client accounting for every odd case: a client named twice, a client not sampled, no examples,
no part, a spoiled part, failures the reply lists (of a kind we do not know too), memory resets,
metrics some reply lacks. Checked against a per-outcome reference written from those rules and
against means computed here."""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmaml.federated import codec
from fedmaml.federated import records as R
from fedmaml.federated import train_outcomes as T
from fedmaml.federated.setup import setup_for
from fedmaml.federated.strategy import MetaStrategy


@pytest.fixture(autouse=True)
def task_identity():
    """Messages take their sender from the process's task identity (as under run_vectorized)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def strategy_for(tiny_config, clients, *overrides):
    strategy = MetaStrategy(setup_for(tiny_config("algorithm.name=moml", *overrides)))
    strategy.round_stats = {"clients": list(clients)}
    return strategy


def filled(like, values):
    """Stacked updates: row ``j`` of every parameter is ``values[j]`` everywhere."""
    return {k: torch.stack([torch.full_like(v, float(x)) for x in values]) if values else
            v.new_zeros((0, *v.shape)) for k, v in like.items()}


def cohort_reply(like, ids, counts, values=None, *, failures=(), parts=None, extra=None):
    """A cohort train reply (records.py) for ``ids``: rows of ``values``, or (``parts``: part,
    rejected reason and the part sums' values) summed by part."""
    n = len(ids)
    metrics = {R.PARTITION: list(ids), R.NUM_EXAMPLES: list(counts), "samples": [7] * n,
               "train-seconds": [0.5 + j for j in range(n)],
               "loss-before": [1.0 + 0.1 * j for j in range(n)],
               "loss-after": [0.5 + 0.01 * j for j in range(n)], **(extra or {})}
    content = RecordDict({R.METRICS: MetricRecord(metrics),
                          R.FAILURES: R.failure_record(list(failures))})
    if parts is None:
        content[R.ARRAYS] = codec.encode(filled(like, values))
    else:
        part_of, rejected, sums = parts
        content[R.PART_SUMS] = codec.encode(filled(like, sums))
        content[R.PARTS] = ConfigRecord({R.PART: list(part_of), R.REJECTED: list(rejected),
                                         R.WEIGHTING: "weighted"})
    return Message(content, 1, "train")


def client_reply(like, cid, count, value, **metrics):
    m = {R.PARTITION: cid, R.NUM_EXAMPLES: count, "samples": 7, "train-seconds": 0.25,
         "loss-before": 2.0, "loss-after": 1.0, **metrics}
    update = {k: torch.full_like(v, float(value)) for k, v in like.items()}
    return Message(RecordDict({R.ARRAYS: codec.encode(update), R.METRICS: MetricRecord(m)}), 1,
                   "train")


def moved_by(strategy, before, step):
    """Whether ``w`` moved from ``before`` by ``step`` everywhere (sgd, server_lr 1)."""
    return all(torch.allclose(strategy.w[k], v + step, atol=1e-6) for k, v in before.items())


def test_a_cohort_reply_naming_a_client_twice_and_one_not_sampled(tiny_config, caplog):
    strategy = strategy_for(tiny_config, range(6))
    before = dict(strategy.w)
    reply = cohort_reply(before, [3, 1, 3, 9, 2], [2, 3, 4, 5, 6], [1.0, 2.0, 3.0, 4.0, 5.0])
    with caplog.at_level(logging.WARNING, logger="fedmaml"):
        _, metrics = strategy.aggregate_train(1, [reply])
    stats = strategy.round_stats
    # the first of client 3's rows is used, the second is a duplicate; 9 was not sampled; 0, 4
    # and 5 sent nothing (one reply row short of the 6 sampled: 1 missing)
    assert (stats["replies"], stats["failures"]) == (3, 3)
    assert stats["failures_by_kind"] == {"error": 0, "timeout": 1, "malformed": 2}
    assert "unexpected reply from client 3 (not sampled, or a duplicate)" in caplog.text
    assert "unexpected reply from client 9 (not sampled, or a duplicate)" in caplog.text
    assert strategy.trained == {1, 2, 3}
    assert moved_by(strategy, before, (2 * 1.0 + 3 * 2.0 + 6 * 5.0) / 11)
    assert metrics["loss-before"] == math.fsum([1.0 + 0.1 * j for j in (0, 1, 4)]) / 3
    assert metrics["samples"] == 21 and metrics["train-seconds-max"] == 4.5


def test_a_summed_reply_spoiled_part_zero_counts_and_rows_without_a_part(tiny_config, caplog):
    strategy = strategy_for(tiny_config, range(6))
    before = dict(strategy.w)
    # rows: 0, 1 in part 0; 2 in part 1 with 2's duplicate (spoils part 1); 4 reports no
    # examples; 5 in no part; 3 rejected (not finite)
    ids, counts = [0, 1, 2, 2, 4, 5, 3], [2, 3, 4, 4, 0, 5, 6]
    part_of, rejected = [0, 0, 1, 1, -1, -1, -1], ["", "", "", "", "", "", "client 3: NaN"]
    reply = cohort_reply(before, ids, counts, parts=(part_of, rejected, [10.0, 99.0]),
                         failures=[(7, "exploded", "boom")])
    with caplog.at_level(logging.WARNING, logger="fedmaml"):
        strategy.aggregate_train(1, [reply])
    stats = strategy.round_stats
    assert stats["replies"] == 2 and stats["rejected"] == 1
    # malformed: 2's duplicate, 2 spoiled, 4 (no examples), 5 (no part); error: 7's unknown kind
    assert stats["failures_by_kind"] == {"error": 1, "timeout": 0, "malformed": 4}
    for text in ("client 4 reported 0 examples", "no part holds client 5's update",
                 "client 2's update is summed with one the server cannot use",
                 "rejected update: client 3: NaN", "exploded: client 7: boom"):
        assert text in caplog.text, text
    assert strategy.trained == {0, 1}
    assert moved_by(strategy, before, 10.0 / 5)  # part 0's sum over its weights 2 + 3


def test_per_client_replies_mixed_with_a_cohort_reply(tiny_config, caplog):
    strategy = strategy_for(tiny_config, range(6))
    before = dict(strategy.w)
    cohort = cohort_reply(before, [5, 0], [1, 2], [4.0, 1.0], extra={R.MEMORY_RESET: [0, 1]})
    replies = [client_reply(before, 3, 3, 2.0, **{R.MEMORY_RESET: 1}),
               cohort,
               Message(Error(code=1, reason="out of memory"), reply_to=cohort),
               client_reply(before, 0, 5, 50.0),  # a duplicate of the cohort's client 0
               client_reply(before, 2, 4, 3.0)]
    del replies[4].content[R.METRICS]["loss-before"]  # a client without the metric
    with caplog.at_level(logging.WARNING, logger="fedmaml"):
        _, metrics = strategy.aggregate_train(1, replies)
    stats = strategy.round_stats
    assert (stats["replies"], stats["failures"]) == (4, 2)
    assert stats["failures_by_kind"] == {"error": 1, "timeout": 0, "malformed": 1}
    assert "client error: out of memory" in caplog.text
    assert stats["memory_reset_clients"] == [0, 3]
    assert strategy.trained == {0, 2, 3, 5}
    # rows of two stacks (the cohort's, the per-client replies'), in client-id order
    assert moved_by(strategy, before, (2 * 1.0 + 4 * 3.0 + 3 * 2.0 + 1 * 4.0) / 10)
    assert "loss-before" not in metrics  # one valid reply lacks it
    assert metrics["loss-after"] == math.fsum([0.5 + 0.01, 1.0, 1.0, 0.5]) / 4
    assert metrics["samples"] == 28 and metrics["train-seconds-max"] == 1.5


# -- against a per-outcome reference -------------------------------------------------------------

LABELS = {"error": "client error", "malformed": "malformed reply"}


def reference(sampled, replies, nan_text):
    """The accounting rules one outcome at a time: per reply its rows (a failure when not
    finite, without examples or without a part), then the failures it lists; an outcome from a
    client not sampled, or a second one, is malformed; an unusable update spoils its part."""
    outcomes = []  # (cid, part, failure)
    for r, (ids, counts, part_of, bad, listed) in enumerate(replies):
        for j, cid in enumerate(ids):
            failure = None
            if j in bad:
                failure = ("rejected", f"rejected update: {nan_text(cid)}")
            elif counts[j] <= 0:
                failure = ("malformed", f"malformed reply: client {cid} reported {counts[j]} examples")
            elif part_of is not None and part_of[j] < 0:
                failure = ("malformed", f"malformed reply: no part holds client {cid}'s update")
            part = (r, part_of[j]) if part_of is not None and failure is None else None
            outcomes.append((cid, part, failure))
        for cid, kind, reason in listed:
            known = kind if kind in ("error", "timeout", "malformed") else "error"
            outcomes.append((cid, None, (known, f"{LABELS.get(kind, kind)}: client {cid}: {reason}")))
    used, errors, spoiled = {}, [], set()
    for cid, part, failure in outcomes:
        if failure is None and (cid not in sampled or cid in used):
            failure = ("malformed", f"unexpected reply from client {cid} (not sampled, or a "
                                    "duplicate)")
            if part is not None:
                spoiled.add(part)
        if failure is None:
            used[cid] = part
        else:
            errors.append(failure)
    for cid, part in list(used.items()):
        if part is not None and part in spoiled:
            del used[cid]
            errors.append(("malformed", f"malformed reply: client {cid}'s update is summed with "
                                        "one the server cannot use"))
    return sorted(used), errors, max(len(set(sampled)) - len(outcomes), 0)


def test_settle_matches_the_per_outcome_rules_on_random_replies(tiny_config):
    like = setup_for(tiny_config()).initial_params
    first = next(iter(like))
    rng = random.Random(26)
    for case in range(60):
        sampled = rng.sample(range(30), rng.randint(0, 12))
        raw, stacks, sums, blocks = [], [], [], []
        for _ in range(rng.randint(1, 3)):
            n = rng.randint(0, 8)
            pool = sampled + [rng.randint(0, 40) for _ in range(3)] or [0]
            ids = [rng.choice(pool) for _ in range(n)]
            counts = [rng.choice([0, 1, 2, 5]) if rng.random() < 0.2 else rng.randint(1, 9)
                      for _ in range(n)]
            bad = {j for j in range(n) if rng.random() < 0.15}
            listed = [(rng.randint(0, 40), rng.choice(["error", "timeout", "malformed", "odd"]),
                       f"reason {case}") for _ in range(rng.randint(0, 2))]
            summed = rng.random() < 0.5
            if summed:
                parts = rng.randint(1, 3)
                part_of = [rng.randint(-1, parts - 1) if j not in bad else -1 for j in range(n)]
                reply = cohort_reply(like, ids, counts, failures=listed, parts=(
                    part_of, ["diverged" if j in bad else "" for j in range(n)],
                    [float(p) for p in range(parts)]))
            else:
                part_of = None
                reply = cohort_reply(like, ids, counts, [math.nan if j in bad else float(j)
                                                         for j in range(n)], failures=listed)
            raw.append((ids, counts, part_of, bad, listed))
            blocks.append(T.from_cohort(reply.content, like, "weighted", stacks, sums))
        outcomes = T.joined(blocks)
        settled = T.settle(outcomes, sampled)
        nan_texts = iter(e for _, e in settled.errors if e.startswith("rejected"))

        def nan_text(cid):  # rows: NaN in the first parameter; sums: the shard's own reason
            text = next(nan_texts)
            assert text in (f"rejected update: update from client {cid}: parameter {first!r} "
                            "contains NaN or infinite values", "rejected update: diverged")
            return text.removeprefix("rejected update: ")

        valid, errors, missing = reference(sampled, raw, nan_text)
        assert outcomes.cids[settled.valid].tolist() == valid, case
        assert settled.errors == errors, case
        assert settled.missing == missing, case


def test_an_unreadable_cohort_reply_fails_every_client_it_was_sent(tiny_config, caplog):
    strategy = strategy_for(tiny_config, range(4))
    reply = cohort_reply(strategy.w, [0, 1], [1, 1], [1.0, 2.0])
    reply.content[R.METRICS] = MetricRecord({R.PARTITION: [0, 1], R.NUM_EXAMPLES: [1]})
    with caplog.at_level(logging.WARNING, logger="fedmaml"):
        assert strategy.aggregate_train(1, [reply]) == (None, None)
    assert "malformed reply: per-client metric lists differ in length" in caplog.text
    # a reply the strategy did not send to a cohort: one failure; the others did not reply
    assert strategy.round_stats["failures_by_kind"] == {"error": 0, "timeout": 3, "malformed": 1}
    assert strategy.trained == set()


def test_int_column_keeps_ints_semantics():
    assert R.int_column([3, 1, 2]).tolist() == [3, 1, 2]
    assert R.int_column([3.7, -1.2]).tolist() == [3, -1]  # as int() truncates
    assert R.int_column([]).dtype == np.int64
    with pytest.raises(ValueError, match="NaN"):
        R.int_column([1.0, math.nan])
    with pytest.raises(ValueError, match="out of range"):
        R.int_column([2 ** 70])
    with pytest.raises(TypeError):
        R.int_column(5)


def test_arrays_record_type_is_checked_on_per_client_replies(tiny_config, caplog):
    strategy = strategy_for(tiny_config, range(3))
    reply = client_reply(strategy.w, 1, 2, 1.0)
    reply.content[R.ARRAYS] = ArrayRecord()
    with caplog.at_level(logging.WARNING, logger="fedmaml"):
        strategy.aggregate_train(1, [reply, client_reply(strategy.w, 2, 2, 1.0)])
    assert strategy.round_stats["replies"] == 1 and strategy.trained == {2}
    assert "malformed update: update from client 1: parameter names differ" in caplog.text


def test_a_per_client_reply_whose_read_metric_is_not_a_number_is_malformed(tiny_config, caplog):
    strategy = strategy_for(tiny_config, range(3))
    bad = client_reply(strategy.w, 1, 2, 1.0, **{"loss-before": [1.0, 2.0]})
    with caplog.at_level(logging.WARNING, logger="fedmaml"):
        _, metrics = strategy.aggregate_train(1, [bad, client_reply(strategy.w, 2, 2, 3.0)])
    assert strategy.round_stats["failures_by_kind"]["malformed"] == 1 and strategy.trained == {2}
    assert "malformed reply: float() argument must be" in caplog.text
    assert metrics["loss-before"] == 2.0
