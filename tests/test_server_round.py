"""The server round on a run axis (fedmaml/federated/server_round.py): rejection, weighted mean,
server optimizer and divergence for several runs with different values, against an independent
float64 computation; one run equals the run-alone arithmetic to the bit; a private run's noise and
account are its own, so a private run of a batch equals the same run alone (rows, model, memories)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedmaml.core.server import ServerOptimizer, aggregate_stacked
from fedmaml.engines.run_batch import RunBatch
from fedmaml.federated.participation import client_sampling, poisson_mask
from fedmaml.federated.privacy import UpdatePrivacy
from fedmaml.federated.server_round import DIVERGED, RoundRecord, aggregate_round
from fedmaml.results.metrics_row import ROUND_KEYS
from fedmaml.federated.strategy import MetaStrategy
from fedmaml.results.recorder import read_summary
from tests.test_run_batch import PER_RUN, assert_equal_to_alone, configs_of, memories_of

SHAPES = {"a": (3, 2), "b": (4,)}


def _updates(runs: int, clients: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(runs, clients, *s, generator=g) for k, s in SHAPES.items()}


def _expected(w, updates, valid, counts, lrs, min_replies, weighted):
    """Per run, in float64 with Python loops: the rejected rows, the mean of the rest, the SGD
    step, whether it applies (enough updates, finite result)."""
    out = []
    for r in range(valid.shape[0]):
        rows = [c for c in range(valid.shape[1]) if valid[r, c]
                and all(math.isfinite(float(x)) for v in updates.values()
                        for x in v[r, c].flatten())]
        rejected = int(valid[r].sum()) - len(rows)
        weights = [float(counts[r, c]) if weighted else 1.0 for c in rows]
        if len(rows) < min_replies:
            out.append((rejected, len(rows), None))
            continue
        new = {}
        for k, v in updates.items():
            mean = sum(weights[i] * v[r, c].double() for i, c in enumerate(rows)) / sum(weights)
            new[k] = w[k][r].double() + lrs[r] * mean
        # the model is float32: a value beyond its range is not finite there
        finite = all(bool(torch.isfinite(v.float()).all()) for v in new.values())
        out.append((rejected, len(rows), new if finite else "diverged"))
    return out


@pytest.mark.parametrize("weighted", [True, False])
def test_several_runs_against_an_independent_computation(weighted):
    runs, clients = 4, 5
    w = {k: torch.randn(runs, *s, generator=torch.Generator().manual_seed(9))
         for k, s in SHAPES.items()}
    updates = _updates(runs, clients)
    updates["a"][0, 1, 0, 0] = float("nan")  # run 0: one update rejected
    updates["b"][1, :, 0] = float("inf")  # run 1: every update rejected (< min_replies)
    updates["b"][2, 3, 1] = 1e38  # run 2: finite updates whose step overflows: diverged
    valid = torch.ones(runs, clients, dtype=torch.bool)
    valid[3, 3:] = False  # run 3: a cohort of 3 padded to 5 (padding may hold anything)
    updates["a"][3, 4] = float("nan")
    counts = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3], [5, 8, 9, 7, 9], [3, 2, 3, 0, 0]],
                          dtype=torch.float64)
    lrs = [1.0, 0.5, 1e10, 2.0]
    opt = ServerOptimizer("sgd", torch.tensor(lrs, dtype=torch.float64),
                          steps=torch.zeros(runs, dtype=torch.float64))
    clients_ = [list(range(r, r + clients)) for r in range(runs)]
    result = aggregate_round(w, opt, updates, valid, clients_,
                             weighting="weighted" if weighted else "uniform", min_replies=2,
                             counts=counts, failed=[[], ["error"], [], []], missing=[0, 0, 1, 2])
    expected = _expected(w, updates, valid, counts, lrs, 2, weighted)
    for r, (rejected, replies, new) in enumerate(expected):
        record = result.records[r]
        assert (record.rejected, record.replies, record.clients) == (rejected, replies, clients_[r])
        assert record.updated == isinstance(new, dict), r
        assert record.diverged == (DIVERGED if new == "diverged" else None), r
        for k in SHAPES:
            if isinstance(new, dict):
                assert torch.allclose(result.w[k][r].double(), new[k], rtol=1e-6, atol=1e-6), (r, k)
            else:  # kept out: exactly the old model
                assert torch.equal(result.w[k][r], w[k][r]), (r, k)
    assert [r.failures for r in result.records] == [1, 6, 1, 2]
    assert result.records[1].failures_by_kind == {"error": 1, "timeout": 0, "malformed": 0}
    assert result.records[3].failures_by_kind["timeout"] == 2
    assert result.moved.tolist() == [True, False, False, True]
    assert opt.steps.tolist() == [1.0, 0.0, 0.0, 1.0]  # the runs kept out did not step
    assert [f.name for f in dataclasses.fields(RoundRecord)] == list(ROUND_KEYS)
    assert list(result.records[2].row()) == list(ROUND_KEYS)
    assert list(result.records[0].row()) == list(ROUND_KEYS[:-1])


def test_adam_per_run_against_an_independent_computation():
    runs, clients = 3, 4
    w = {k: torch.zeros(runs, *s) for k, s in SHAPES.items()}
    lrs = torch.tensor([0.1, 0.01, 0.5], dtype=torch.float64)
    opt = ServerOptimizer("adam", lrs, betas=(0.9, 0.99), eps=1e-8,
                          steps=torch.zeros(runs, dtype=torch.float64))
    m = {k: torch.zeros(runs, *s, dtype=torch.float64) for k, s in SHAPES.items()}
    v = {k: torch.zeros(runs, *s, dtype=torch.float64) for k, s in SHAPES.items()}
    ref = {k: x.double() for k, x in w.items()}
    for step in (1, 2, 3):
        updates = _updates(runs, clients, seed=step)
        result = aggregate_round(w, opt, updates, torch.ones(runs, clients, dtype=torch.bool),
                                 [[0, 1, 2, 3]] * runs, weighting="uniform", min_replies=1)
        w = result.w
        for k in SHAPES:
            d = updates[k].double().mean(1)
            m[k] = 0.9 * m[k] + 0.1 * d
            v[k] = 0.99 * v[k] + 0.01 * d ** 2
            lr = lrs.reshape(-1, *([1] * len(SHAPES[k])))
            ref[k] = ref[k] + lr * (m[k] / (1 - 0.9 ** step)) / (
                (v[k] / (1 - 0.99 ** step)).sqrt() + 1e-8)
            assert torch.allclose(w[k].double(), ref[k], rtol=1e-5, atol=1e-6), (step, k)


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("weighting", ["weighted", "uniform"])
def test_one_run_is_the_run_alone_arithmetic_to_the_bit(kind, weighting):
    """R = 1 (what MetaStrategy calls) gives the bits of the arithmetic a run alone always had:
    ``aggregate_stacked`` then the optimizer's step on ``w`` without a run axis."""
    updates = _updates(1, 7, seed=3)
    counts = [5, 1, 7, 3, 2, 8, 4]
    w = {k: torch.randn(*s) for k, s in SHAPES.items()}
    alone = ServerOptimizer(kind, 0.3)
    batched = ServerOptimizer(kind, 0.3)
    w_alone, w_one = w, {k: v.unsqueeze(0) for k, v in w.items()}
    for _ in range(3):  # momentum and Adam carry state between rounds
        w_alone = alone.step(w_alone, aggregate_stacked({k: v[0] for k, v in updates.items()},
                                                        counts, weighting))
        w_one = aggregate_round(w_one, batched, updates, torch.ones(1, 7, dtype=torch.bool),
                                [list(range(7))], weighting=weighting, min_replies=1,
                                counts=torch.tensor([counts], dtype=torch.float64)).w
        updates = {k: v * 0.5 for k, v in updates.items()}
    for k in w:
        assert torch.equal(w_one[k][0], w_alone[k]), k
    assert batched.steps == alone.steps == 3


def _privacy(tiny_config, seed, noise=1.0):
    cfg = tiny_config("privacy.clipping=server", "privacy.clipping_norm=0.5",
                      f"privacy.noise_multiplier={noise}", "federated.aggregation=uniform",
                      f"seed={seed}")
    return UpdatePrivacy(cfg, client_sampling(cfg.federated, cfg.data.num_clients))


def test_a_private_run_of_a_batch_is_the_run_alone_to_the_bit(tiny_config):
    """Each run clips and noises with its own stream (seed, round) and counts its own releases."""
    updates = _updates(3, 4, seed=5)
    w = {k: torch.zeros(3, *s) for k, s in SHAPES.items()}
    privacy = [_privacy(tiny_config, s) for s in (0, 1, 2)]
    opt = ServerOptimizer("sgd", torch.ones(3, dtype=torch.float64),
                          steps=torch.zeros(3, dtype=torch.float64))
    valid = torch.ones(3, 4, dtype=torch.bool)
    batch = aggregate_round(w, opt, updates, valid, [[0, 1, 2, 3]] * 3, weighting="uniform",
                            min_replies=1, privacy=privacy, round_number=4)
    for r, seed in enumerate((0, 1, 2)):
        alone = _privacy(tiny_config, seed)
        one = aggregate_round({k: v[r:r + 1] for k, v in w.items()}, ServerOptimizer("sgd", 1.0),
                              {k: v[r:r + 1] for k, v in updates.items()}, valid[r:r + 1],
                              [[0, 1, 2, 3]], weighting="uniform", min_replies=1,
                              privacy=[alone], round_number=4)
        for k in SHAPES:
            assert torch.equal(batch.w[k][r], one.w[k][0]), (r, k)
        assert privacy[r].state() == alone.state() and alone.releases == 1
    assert not torch.equal(batch.w["a"][0], batch.w["a"][1])  # different streams


def test_the_strategy_applies_its_round_through_the_shared_round(tiny_config):
    """MetaStrategy's server round (R = 1) keeps its optimizer state without a run axis."""
    strategy = MetaStrategy(__import__("fedmaml.federated.setup", fromlist=["setup_for"])
                            .setup_for(tiny_config("federated.server_optimizer=momentum")))
    strategy.round_stats = {"clients": [0, 1]}
    w0 = dict(strategy.w)
    stacked = {k: torch.ones(2, *v.shape) for k, v in w0.items()}
    record = strategy._server_round(1, stacked, [3, 4], [], 0)
    assert record.updated and record.replies == 2
    assert {k: v.shape for k, v in strategy.optimizer.state.items()} == \
        {f"m.{k}": v.shape for k, v in w0.items()}
    assert all(torch.equal(strategy.w_before_update[k], w0[k]) for k in w0)


@pytest.mark.parametrize("clipping", ["server", "client"])
def test_a_private_run_of_a_batch_equals_the_same_run_alone(tiny_config, tmp_path, clipping):
    """Differential privacy in a batch (rows, model, memories, privacy summary)."""
    cfgs = configs_of(tiny_config, tmp_path, (
        "algorithm.name=moml", f"privacy.clipping={clipping}", "privacy.clipping_norm=0.05",
        "privacy.noise_multiplier=0.5", "federated.aggregation=uniform"), PER_RUN[:2])
    batch = RunBatch(cfgs, [tmp_path / "batch" / c.name for c in cfgs])
    batch.run()
    for i, cfg in enumerate(cfgs):
        assert_equal_to_alone(cfg, tmp_path / "batch" / cfg.name, tmp_path / "alone" / cfg.name,
                              memories_of(batch, i))
        privacy = read_summary(tmp_path / "batch" / cfg.name)["privacy"]
        assert privacy["releases"] == cfg.federated.rounds and privacy["epsilon"] > 0


@pytest.mark.parametrize("private, runs", [(False, 3), (True, 3), (True, 1)])
def test_a_poisson_sampled_run_of_a_batch_equals_the_same_run_alone(tiny_config, tmp_path,
                                                                   private, runs):
    """Poisson cohorts vary in size (empty ones too): a batch pads them and masks the padding out
    (the server round's valid mask); a private run releases its noise even in an empty round (with
    one run, seed 0: rounds where the whole batch has nobody)."""
    dp = ("privacy.clipping=server", "privacy.clipping_norm=0.05", "privacy.noise_multiplier=0.5",
          "federated.aggregation=uniform") if private else ("federated.aggregation=weighted",)
    cfgs = configs_of(tiny_config, tmp_path, ("algorithm.name=moml", "federated.sampling=poisson",
                                              "federated.clients_per_round=2", *dp),
                      PER_RUN[:runs])
    sizes = [[int(poisson_mask(c.seed, r, 6, 2 / 6).sum()) for c in cfgs] for r in range(1, 5)]
    assert 0 in sum(sizes, []), sizes  # empty cohorts...
    assert runs == 1 or any(len(set(s)) > 1 for s in sizes), sizes  # ...of different sizes
    batch = RunBatch(cfgs, [tmp_path / "batch" / c.name for c in cfgs])
    batch.run()
    for i, cfg in enumerate(cfgs):
        assert_equal_to_alone(cfg, tmp_path / "batch" / cfg.name, tmp_path / "alone" / cfg.name,
                              memories_of(batch, i))
        if private:
            assert read_summary(tmp_path / "batch" / cfg.name)["privacy"]["releases"] == 4


def test_updates_the_caller_checked_give_the_same_round_to_the_bit():
    """``finite=True`` (a run alone's decoder has rejected NaN/inf) skips step 1's check only: on
    finite updates the round is the one ``aggregate_round`` computes checking them itself, and a
    step that overflows is still kept out."""
    w = {k: torch.randn(1, *s, generator=torch.Generator().manual_seed(3)) for k, s in SHAPES.items()}
    for big in (1.0, 1e38):
        updates = _updates(1, 3)
        updates["b"][0, 1, 0] = big
        results = []
        for finite in (False, True):
            opt = ServerOptimizer("sgd", 1e10 if big > 1 else 1.0)
            results.append(aggregate_round(
                w, opt, updates, torch.ones(1, 3, dtype=torch.bool), [[4, 5, 6]],
                weighting="uniform", min_replies=1, finite=finite))
        checked, trusted = results
        assert checked.moved.tolist() == trusted.moved.tolist() == [big == 1.0]
        assert checked.records[0].row() == trusted.records[0].row()
        assert all(torch.equal(checked.w[k], trusted.w[k]) for k in w)
