"""Participation models (fedmaml/federated/participation.py) and the memory diagnostics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedmaml.config import ConfigError, ParticipationConfig, replace_path, replace_paths
from fedmaml.core.diagnostics import tracking_error
from fedmaml.core.losses import mse
from fedmaml.core.patterns import Pattern
from fedmaml.experiment import run_experiment
from fedmaml.federated.participation import (Participation, Staleness, sample_clients,
                                             staleness_stats)
from fedmaml.models.mlp import mlp


def frequencies(part: Participation, rounds: int) -> np.ndarray:
    """Per client, the fraction of rounds 1..rounds it was available."""
    return np.mean([part.available(r) for r in range(1, rounds + 1)], axis=0)


def test_uniform_is_the_plain_seeded_sample():
    part = Participation(ParticipationConfig(), seed=3, num_clients=50)
    for r in (1, 2, 17):
        assert part.cohort(r, 5) == sample_clients(3, r, 50, 5)
    assert part.available(1) is None and part.last_available is None


def test_heterogeneous_long_run_availability_matches_each_clients_probability():
    n, rounds = 40, 3000
    part = Participation(ParticipationConfig("heterogeneous", beta_a=0.5, beta_b=0.5), 7, n)
    p = part.constants()
    assert p.min() < 0.2 and p.max() > 0.8  # Beta(0.5, 0.5): really heterogeneous
    # A client's count is Binomial(rounds, p_i): |freq - p_i| <= 4.5 sigma for all 40 clients fails
    # with probability about 40 * 6.8e-6 = 3e-4 (union bound) if the model is right, while an
    # availability that ignored p_i (e.g. the mean 0.5 for everybody) misses by ~0.3 = 30+ sigma.
    sigma = np.sqrt(p * (1 - p) / rounds)
    assert np.all(np.abs(frequencies(part, rounds) - p) <= 4.5 * sigma + 1e-12)
    # With a cohort as large as the federation, a client participates exactly when available.
    cohort = part.cohort(5, n)
    assert cohort == [int(c) for c in np.flatnonzero(part.available(5))]


def test_markov_long_run_availability_and_stretch_lengths():
    n, rounds, off, on = 200, 1500, 0.05, 0.2  # available 80 % of rounds, stretches of 20 and 5
    spec = ParticipationConfig("markov", markov_on_to_off=off, markov_off_to_on=on)
    part = Participation(spec, 11, n)
    states = np.array([part.available(r) for r in range(1, rounds + 1)])
    pi = on / (on + off)
    # The chain's lag-1 autocorrelation is lam = 1 - on - off; the variance of a client's long-run
    # fraction is pi (1 - pi) / rounds * (1 + lam) / (1 - lam), and the n clients are independent:
    # the pooled mean is within 5 of its standard deviations (a 6e-7 false alarm).
    lam = 1 - on - off
    sd = math.sqrt(pi * (1 - pi) / rounds * (1 + lam) / (1 - lam) / n)
    assert abs(states.mean() - pi) <= 5 * sd
    # Stretches are geometric: off stretches last 1 / on = 5 rounds on average, on stretches 1 / off
    # = 20 (censored ones at the ends excluded). Thousands of stretches: 10 % is > 5 standard
    # errors.
    off_lengths, on_lengths = [], []
    for c in range(n):
        s = states[:, c]
        edges = np.flatnonzero(np.diff(s.astype(int))) + 1
        for a, b in zip(edges[:-1], edges[1:]):
            (on_lengths if s[a] else off_lengths).append(b - a)
    assert abs(np.mean(off_lengths) - 1 / on) < 0.1 / on
    assert abs(np.mean(on_lengths) - 1 / off) < 0.1 / off
    # The state at a round is a function of (seed, round): asked out of order, or by a new object.
    again = Participation(spec, 11, n)
    assert np.array_equal(again.available(700), states[699])
    assert np.array_equal(part.available(3), states[2])


def test_diurnal_availability_follows_the_cycle():
    n, period = 4000, 8
    spec = ParticipationConfig("diurnal", diurnal_period=period, diurnal_mean=0.5,
                               diurnal_amplitude=0.4, diurnal_phase_spread=0.0)
    part = Participation(spec, 5, n)
    for r in range(1, period + 1):
        expected = 0.5 + 0.4 * math.cos(2 * math.pi * r / period)
        # n Bernoulli draws: 5 standard deviations of the fraction (<= 0.5 / sqrt(n) = 0.008)
        assert abs(part.available(r).mean() - expected) <= 5 * math.sqrt(0.25 / n)
    spread = Participation(ParticipationConfig("diurnal", diurnal_period=period,
                                                     diurnal_phase_spread=1.0), 5, n)
    # Phases spread over a whole cycle: the federation's availability no longer cycles.
    assert all(abs(spread.available(r).mean() - 0.5) < 0.05 for r in range(1, period + 1))


def test_cohort_is_drawn_among_available_clients_and_shortfall_takes_them_all():
    n = 30
    part = Participation(ParticipationConfig("heterogeneous", beta_a=1.0, beta_b=3.0), 2, n)
    sizes = []
    for r in range(1, 200):
        available = set(np.flatnonzero(part.available(r)).tolist())
        cohort = part.cohort(r, 6)
        assert set(cohort) <= available and len(set(cohort)) == len(cohort)
        assert len(cohort) == min(6, len(available)) and part.last_available == len(available)
        sizes.append(len(cohort))
    assert min(sizes) < 6 and max(sizes) == 6  # both cases happened (mean availability 1/4)
    # Nobody available: an empty cohort.
    rare = Participation(ParticipationConfig("heterogeneous", beta_a=0.01, beta_b=50.0), 0, 5)
    assert any(rare.cohort(r, 2) == [] for r in range(1, 20))


def test_same_seed_same_cohorts_and_another_seed_differs():
    spec = ParticipationConfig("markov", markov_on_to_off=0.3, markov_off_to_on=0.3)
    a = [Participation(spec, 4, 100).cohort(r, 10) for r in range(1, 30)]
    b_part = Participation(spec, 4, 100)
    assert a == [b_part.cohort(r, 10) for r in range(1, 30)]
    assert a != [Participation(spec, 5, 100).cohort(r, 10) for r in range(1, 30)]


def test_staleness_bookkeeping_by_hand():
    s = Staleness(6)
    s.record(1, [0, 1])
    s.record(3, [1, 2])
    s.record(3, [4, 5])  # the same round asked again: ignored
    s.record(7, [0, 1, 2])
    # gaps: round 1: first, first; round 3: 2 (client 1), first; round 7: 6, 4, 4
    assert s.total == {0: 3, 2: 1, 6: 1, 4: 2}
    stats = s.run_stats()
    assert stats["participations"] == 7 and stats["first"] == pytest.approx(3 / 7)
    assert stats["mean"] == pytest.approx((2 + 6 + 4 + 4) / 4)
    assert (stats["p50"], stats["p90"], stats["max"]) == (4.0, 6.0, 6.0)
    assert s.age(1, 9) == 2 and math.isnan(s.age(3, 9)) and s.clients_seen == 3
    assert s.take_window()["participations"] == 7 and s.take_window() == {}
    assert staleness_stats({0: 2}) == {"participations": 2.0, "first": 1.0}


def test_tracking_error_matches_a_hand_computation_in_float64():
    # A linear model y = a x + b with mean squared error: one full adaptation step is
    # A(w) = w - alpha * (mean(2 r x), mean(2 r)), r = a x + b - y.
    model = mlp((1,), [], 1)
    w = {"layer1.weight": torch.tensor([[0.7]], dtype=torch.float64),
         "layer1.bias": torch.tensor([-0.3], dtype=torch.float64)}
    assert set(w) == set(model.init(0))
    x = torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    y = torch.tensor([[2.0], [0.0], [1.0]], dtype=torch.float64)
    u = {"layer1.weight": torch.tensor([[1.1]], dtype=torch.float64),
         "layer1.bias": torch.tensor([0.2], dtype=torch.float64)}
    alpha = 0.1
    xs, ys = [1.0, -2.0, 0.5], [2.0, 0.0, 1.0]
    r = [0.7 * xi - 0.3 - yi for xi, yi in zip(xs, ys)]
    a1 = 0.7 - alpha * sum(2 * ri * xi for ri, xi in zip(r, xs)) / 3
    b1 = -0.3 - alpha * sum(2 * ri for ri in r) / 3
    expected = math.hypot(1.1 - a1, 0.2 - b1) / math.hypot(a1, b1)
    got = tracking_error(model, mse, w, u, x, y, Pattern.full(1, 1), alpha)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(expected, rel=1e-12)
    exact = {"layer1.weight": torch.tensor([[a1]], dtype=torch.float64),
             "layer1.bias": torch.tensor([b1], dtype=torch.float64)}
    assert float(tracking_error(model, mse, w, exact, x, y, Pattern.full(1, 1), alpha)) == \
        pytest.approx(0, abs=1e-15)


def test_participation_config_is_validated(tiny_config):
    cfg = tiny_config()
    with pytest.raises(ConfigError, match="participation.model: 'sometimes' is not allowed"):
        replace_path(cfg, "participation.model", "sometimes")
    with pytest.raises(ConfigError, match="participation.diurnal_amplitude: 0.4 around "
                                          "diurnal_mean 0.8 leaves"):
        replace_paths(cfg, {"participation.model": "diurnal", "participation.diurnal_mean": 0.8})
    with pytest.raises(ConfigError, match="needs federated.mode 'cross_device'"):
        replace_paths(cfg, {"participation.model": "markov", "federated.mode": "cross_silo"})
    with pytest.raises(ConfigError, match=r"participation.markov_off_to_on: 0.0 is out of "
                                          r"range; allowed: \(0, 1\]"):
        replace_path(cfg, "participation.markov_off_to_on", 0)


def read_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", ["heterogeneous", "markov", "diurnal"])
def test_same_seed_same_cohorts_on_the_inprocess_and_vectorized_engines(tiny_config, tmp_path,
                                                                       model):
    cfg = tiny_config("algorithm.name=moml", f"participation.model={model}",
                      "participation.diurnal_period=3", "federated.rounds=4")
    rows = {engine: read_rows(run_experiment(replace_path(cfg, "engine.name", engine), quiet=True,
                                             run_dir=tmp_path / engine))
            for engine in ("inprocess", "vectorized")}
    part = Participation(cfg.participation, cfg.seed, 6)
    expected = [part.cohort(r, 3) for r in range(1, 5)]
    for engine, rs in rows.items():
        assert [r["clients"] for r in rs[1:]] == expected, engine
        assert all(r["replies"] == len(r["clients"]) for r in rs[1:]), engine


def test_memory_diagnostics_are_recorded_and_consistent(tiny_config, tmp_path):
    from fedmaml.federated.setup import setup_for

    cfg = tiny_config("algorithm.name=moml", "federated.rounds=5", "federated.eval_every=1",
                      "federated.clients_per_round=2")
    run_dir = run_experiment(cfg, quiet=True, run_dir=tmp_path / "run")
    rows = read_rows(run_dir)
    # Staleness recomputed from the sampled clients of each round.
    last: dict[int, int] = {}
    for row in rows[1:]:
        gaps = [row["round"] - last[c] for c in row["clients"] if c in last]
        first = sum(c not in last for c in row["clients"])
        ev = row["eval"]
        assert ev["sampled.first.fraction"] == pytest.approx(first / len(row["clients"]))
        if gaps:
            assert ev["sampled.staleness.mean"] == pytest.approx(np.mean(gaps))
            assert ev["sampled.staleness.max"] == max(gaps)
        else:
            assert "sampled.staleness.mean" not in ev
        last.update({c: row["round"] for c in row["clients"]})
        assert ev["memory.clients.count"] == len(last)
        assert ev["memory.bytes.total"] == len(last) * ev["memory.bytes.client"]
        ages = [row["round"] - last[c] for c in ev["seen.ids"] if c in last]
        assert [a for a in ev["seen.staleness.clients"] if a is not None] == ages
    per_client = sum(v.numel() * 4 for v in setup_for(cfg).initial_params.values())
    assert rows[-1]["eval"]["memory.bytes.client"] == per_client
    final = rows[-1]["eval"]
    for gap, loss, mloss in zip(final["seen.memory-gap.clients"], final["seen.loss.clients"],
                                final["seen.memory-loss.clients"]):
        assert (gap is None) == (mloss is None)
        if gap is not None:
            assert gap == pytest.approx(mloss - loss, abs=1e-6)
    assert all(0 <= t < 1 for t in final["seen.tracking-error.clients"] if t is not None)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["participation"]["clients_participated"] == len(last)
    assert "seen.tracking-error.mean" in summary["after"]

    # Without memory: no tracking error or gap, a zero footprint; and it can be switched off.
    plain = read_rows(run_experiment(replace_path(cfg, "algorithm.name", "per_fedavg"), quiet=True,
                                     run_dir=tmp_path / "plain"))
    assert "seen.tracking-error.mean" not in plain[-1]["eval"]
    assert plain[-1]["eval"]["memory.bytes.total"] == 0
    silo = read_rows(run_experiment(replace_path(cfg, "federated.mode", "cross_silo"), quiet=True,
                                    run_dir=tmp_path / "silo"))
    assert silo[-1]["eval"]["sampled.staleness.max"] == 1  # every silo, every round
    assert silo[-1]["eval"]["memory.clients.count"] == cfg.data.num_clients
    off = read_rows(run_experiment(replace_path(cfg, "evaluation.tracking_error", False),
                                   quiet=True, run_dir=tmp_path / "off"))
    assert "seen.tracking-error.mean" not in off[-1]["eval"]
    assert "seen.memory-gap.mean" in off[-1]["eval"]

    # `fedmaml compare` plots the diagnostics like any other metric.
    from fedmaml.results.compare import axis_label
    from fedmaml.results.compare_outputs import compare

    out = compare([run_dir, tmp_path / "plain"], tmp_path / "cmp", metric="sampled.staleness.mean")
    assert any(p.name.startswith("convergence-sampled.staleness.mean") for p in out.figures)
    assert "over clients" not in axis_label("sampled.staleness.mean")
    assert "tracking error" in axis_label("seen.tracking-error.mean")


@pytest.mark.ray
@pytest.mark.slow
def test_same_seed_same_cohorts_on_the_ray_engine(tiny_config, tmp_path, ray_guard):
    # About 30-50 s on 2 busy cores, nearly all of it starting Ray.
    cfg = tiny_config("algorithm.name=moml", "participation.model=markov",
                      "participation.markov_on_to_off=0.5", "engine.num_cpus=1")
    ray_rows = read_rows(run_experiment(replace_path(cfg, "engine.name", "ray"), quiet=True,
                                        run_dir=tmp_path / "ray"))
    local_rows = read_rows(run_experiment(cfg, quiet=True, run_dir=tmp_path / "inprocess"))
    assert [r["clients"] for r in ray_rows[1:]] == [r["clients"] for r in local_rows[1:]]
    assert [r["available"] for r in ray_rows[1:]] == [r["available"] for r in local_rows[1:]]
    for key in ("seen.tracking-error.mean", "sampled.first.fraction", "memory.bytes.total"):
        assert ray_rows[-1]["eval"][key] == pytest.approx(local_rows[-1]["eval"][key], rel=1e-5)


def test_tracking_error_is_measured_at_the_final_w_from_each_clients_own_memory(tiny_config,
                                                                                tmp_path):
    """The recorded value equals the definition recomputed from the run's final model and the
    memory the client's node holds: the right w, the right memory, the adaptation split."""
    from fedmaml.engines.inprocess import FIRST_CLIENT_NODE, run_inprocess
    from fedmaml.federated import node_config
    from fedmaml.federated.client_app import make_client_app
    from fedmaml.federated.server_app import make_server_app
    from fedmaml.federated.setup import setup_for

    cfg = tiny_config("algorithm.name=moml", "federated.rounds=4", "federated.clients_per_round=2",
                      "algorithm.inner_steps=2")
    setup = setup_for(cfg)
    n = cfg.data.num_clients
    grid = run_inprocess(make_server_app(cfg, tmp_path / "run", quiet=True), make_client_app(cfg),
                         n + cfg.data.unseen_clients)
    final = read_rows(tmp_path / "run")[-1]["eval"]
    w = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    checked = 0
    for cid, recorded in zip(final["seen.ids"], final["seen.tracking-error.clients"]):
        context = grid.contexts.get(cid + FIRST_CLIENT_NODE)
        memory = (None if context is None else
                  node_config.memory_store(context, cid, like=setup.initial_params).load())
        assert (memory is None) == (recorded is None), cid
        if memory is None:
            continue
        x, y = setup.federation.client_tasks(cid)[0].evaluation_split()[:2]
        u = {k: v[0] for k, v in memory.items()}
        expected = tracking_error(setup.model, setup.loss_fn, w, u, x, y,
                                  setup.hyper.step.memory_pattern, cfg.algorithm.alpha)
        assert recorded == pytest.approx(float(expected), rel=1e-5)
        checked += 1
    assert checked >= 2


def test_a_round_with_fewer_available_clients_than_min_replies_leaves_w_unchanged(tiny_config,
                                                                                    tmp_path):
    # Beta(0.3, 1) over 6 clients, cohorts of 3 (seed 0): rounds 1-6 have 2, 2, 0, 3, 2 and 3
    # clients available, so the run sees a shortfall, an empty round and a full cohort.
    cfg = tiny_config("algorithm.name=moml", "participation.model=heterogeneous",
                      "participation.beta_a=0.3", "participation.beta_b=1", "federated.rounds=6",
                      "federated.min_replies=1")
    rows = read_rows(run_experiment(cfg, quiet=True, run_dir=tmp_path / "run"))[1:]
    empty = [r for r in rows if r["available"] == 0]
    assert empty, "the draw should leave some round without available clients"
    for r in empty:
        assert r["clients"] == [] and r["replies"] == 0 and r["failures"] == 0
        assert r["updated"] is False
    for r in rows:
        assert len(r["clients"]) == min(3, r["available"])
        if r["clients"]:
            assert r["replies"] == len(r["clients"]) and r["updated"] is True
    assert {len(r["clients"]) for r in rows} == {0, 2, 3}
