"""The clients of a batch of runs (fedmaml/engines/run_batch.py) go through the client library
(fedmaml/client/) as a run alone's do: with injected faults, and with compute-speed models under a
round deadline, every run of a batch equals the same run alone on the in-process engine (rows,
summary, final model, every client's memory); the library's cohort decisions equal its one-client
decisions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmaml.client import client_fault
from fedmaml.client.faults import KINDS, fault_codes, fault_rates, injected_counts
from fedmaml.client.speed import (client_seconds, past_deadline, simulated_seconds,
                                  speed_multipliers)
from fedmaml.client.train import clip_client_updates, memory_init_mask, needs_memory_init
from fedmaml.config import ParticipationConfig, replace_paths
from fedmaml.core.privacy import clip_update
from fedmaml.engines.batch_plan import batch_refusal
from fedmaml.engines.run_batch import RunBatch
from fedmaml.results.recorder import read_metrics, read_summary
from tests.test_run_batch import PER_RUN, assert_equal_to_alone, memories_of


def run_batch_and_compare(cfgs, tmp_path):
    for c in cfgs:
        assert batch_refusal(c) is None, c.name
    batch = RunBatch(cfgs, [tmp_path / "batch" / c.name for c in cfgs])
    batch.run()
    for i, cfg in enumerate(cfgs):
        assert_equal_to_alone(cfg, tmp_path / "batch" / cfg.name, tmp_path / "alone" / cfg.name,
                              memories_of(batch, i))
    return [read_metrics(tmp_path / "batch" / c.name) for c in cfgs]


def test_cohort_fault_codes_equal_each_clients_own_decision(tiny_config):
    cfg = tiny_config("faults.fail=0.2", "faults.straggle=0.3", "faults.dropout=0.1",
                      "federated.round_timeout=5")
    seeds, cids = np.asarray([3, 11]), np.asarray([[0, 4, 5, 9], [9, 1, 2, 3]])
    codes = fault_codes(fault_rates(cfg), seeds[:, None], cids, 7)  # [runs, clients] at once
    for r, seed in enumerate(seeds.tolist()):
        alone = replace_paths(cfg, {"seed": seed})
        for c, cid in enumerate(cids[r].tolist()):
            kind = client_fault(alone, cid, 7)
            assert (KINDS[codes[r, c] - 1] if codes[r, c] else None) == kind


def test_injected_counts_count_each_runs_codes():
    codes = np.random.default_rng(5).integers(0, 4, size=(6, 9)).astype(np.int8)  # [runs, clients]
    assert injected_counts(codes) == [{k: sum(1 for c in row if c == j + 1)
                                       for j, k in enumerate(KINDS)} for row in codes.tolist()]
    assert injected_counts(np.zeros((2, 0), dtype=np.int8)) == [dict.fromkeys(KINDS, 0)] * 2


def test_a_fault_is_one_uniform_draw_of_the_clients_stream_cut_at_the_rates(tiny_config):
    """Computed independently: numpy's generator keyed by (seed, client, round, 0xFA17), its first
    uniform cut at fail, fail + straggle, fail + straggle + dropout (the draw every engine made
    before the client library, so runs keep their faults)."""
    cfg = tiny_config("seed=4", "faults.fail=0.25", "faults.straggle=0.15", "faults.dropout=0.1",
                      "federated.round_timeout=5")
    for cid in range(60):
        for r in range(1, 8):
            u = np.random.default_rng([4, cid, r, 0xFA17]).random()
            want = ("fail" if u < 0.25 else "straggle" if u < 0.4 else "dropout" if u < 0.5
                    else None)
            assert client_fault(cfg, cid, r) == want


def test_one_clients_shortcuts_equal_the_cohort_functions(tiny_config):
    """A ClientApp's one client skips the array work when a feature is off (no faults, uniform
    speed, no deadline, a memory kept): its decisions are the cohort functions' all the same."""
    off = tiny_config("federated.round_timeout=0")
    on = tiny_config("faults.fail=0.3", "faults.dropout=0.2", "participation.speed=lognormal",
                     "participation.speed_sigma=1.5", "federated.round_timeout=0.5")
    for cfg in (off, on):
        codes = fault_codes(fault_rates(cfg), cfg.seed, np.arange(40), 3)
        assert [client_fault(cfg, c, 3) for c in range(40)] == [
            KINDS[k - 1] if k else None for k in codes]
        for cid in range(40):
            seconds = client_seconds(cfg.participation, cfg.seed, cid, 0.3)
            assert seconds == float(simulated_seconds(cfg.participation, cfg.seed, [cid], 0.3)[0])
            assert past_deadline(cfg, seconds) == bool(past_deadline(cfg, np.asarray([seconds]))[0])
    assert any(client_fault(on, c, 3) for c in range(40))  # the "on" case draws faults
    assert len({client_seconds(on.participation, on.seed, c, 0.3) for c in range(40)}) == 40
    setup = type("S", (), {"algorithm": type("A", (), {"uses_memory": True})()})()
    for policy in ("keep", "reinit"):
        hp = type("H", (), {"memory_policy": policy})()
        for has in (False, True):
            assert needs_memory_init(setup, hp, has) == bool(memory_init_mask(True, hp, has))
    setup.algorithm.uses_memory = False
    assert not needs_memory_init(setup, hp, False)


def test_the_deadline_judges_a_measured_time_only_on_the_engines_clock(tiny_config):
    """One deadline rule: a client judges itself only a simulated time; the engine's clock (a batch
    of runs judging every time, ``clock=True``) judges a measured one too; no deadline, no one."""
    times = np.asarray([0.2, 0.7, 0.5])
    uniform = tiny_config("federated.round_timeout=0.5")
    assert past_deadline(uniform, 0.7) is False
    assert not past_deadline(uniform, times).any()
    assert past_deadline(uniform, 0.7, clock=True) is True
    assert past_deadline(uniform, times, clock=True).tolist() == [False, True, False]
    simulated = tiny_config("federated.round_timeout=0.5", "participation.speed=lognormal")
    for clock in (False, True):
        assert past_deadline(simulated, times, clock=clock).tolist() == [False, True, False]
        assert past_deadline(simulated, 0.7, clock=clock) is True
    never = tiny_config("federated.round_timeout=0")
    assert past_deadline(never, 1e9, clock=True) is False
    assert not past_deadline(never, times, clock=True).any()


def test_cohort_speeds_and_clipping_equal_each_clients_own():
    spec = ParticipationConfig(speed="lognormal", speed_sigma=2.0)
    seeds, cids = np.asarray([5, 6]), np.asarray([[0, 3, 7], [7, 3, 0]])
    m = speed_multipliers(spec, seeds, cids)  # [runs, clients]
    for r, seed in enumerate(seeds.tolist()):
        assert np.array_equal(m[r], speed_multipliers(spec, seed, cids[r]))

    class Privacy:
        clipping, clipping_norm = "client", 0.5

    class Cfg:
        privacy = Privacy()

    delta = {"w": torch.randn(2, 3, 4, 5), "b": torch.randn(2, 3, 5)}  # [runs, clients, ...]
    clipped = clip_client_updates(Cfg(), delta, client_axes=2)
    for r in range(2):
        for c in range(3):
            one = clip_update({k: v[r, c] for k, v in delta.items()}, 0.5)
            for k in delta:
                assert torch.equal(clipped[k][r, c], one[k])


def test_a_batch_with_injected_faults_equals_each_run_alone(tiny_config, tmp_path):
    base = tiny_config("algorithm.name=moml", "faults.fail=0.2", "faults.straggle=0.2",
                       "faults.dropout=0.1", "federated.round_timeout=60", "federated.rounds=4")
    cfgs = [replace_paths(base, {**values, "name": f"run{j}"}) for j, values in enumerate(PER_RUN)]
    rows = [r for run in run_batch_and_compare(cfgs, tmp_path) for r in run[1:]]
    # the test sees every kind of fault, and what they do
    assert sum(r["injected"]["fail"] for r in rows) > 0
    assert sum(r["injected"]["straggle"] + r["injected"]["dropout"] for r in rows) > 0
    assert sum(r["failures_by_kind"]["error"] for r in rows) > 0
    assert sum(r["failures_by_kind"]["timeout"] for r in rows) > 0


# As tests/test_speed.py: with sigma 20 and a deadline T, a tiny client's measured time (its share
# of the batch's, 1e-5 s to 30 s on any machine) makes it surely late when its multiplier exceeds
# T / 1e-5 and surely on time below T / 30; the seeds are the first whose six clients are all sure,
# some late and at least two not.
def sure_seeds(count, timeout=1.0):
    spec = ParticipationConfig(speed="lognormal", speed_sigma=20.0)
    seeds = []
    for seed in range(5000):
        m = speed_multipliers(spec, seed, np.arange(6))
        late, ok = m > timeout / 1e-5, m < timeout / 30
        if np.all(late | ok) and late.any() and ok.sum() >= 2:
            seeds.append(seed)
            if len(seeds) == count:
                return seeds
    raise AssertionError("no seeds")


def test_a_batch_with_speeds_and_a_deadline_equals_each_run_alone(tiny_config, tmp_path):
    base = tiny_config("algorithm.name=moml", "participation.speed=lognormal",
                       "participation.speed_sigma=20", "federated.round_timeout=1",
                       "federated.rounds=4", "federated.eval_every=2")
    seeds = sure_seeds(len(PER_RUN))
    cfgs = [replace_paths(base, {**values, "seed": seed, "name": f"run{j}"})
            for j, (values, seed) in enumerate(zip(PER_RUN, seeds))]
    rows = [r for run in run_batch_and_compare(cfgs, tmp_path) for r in run[1:]]
    assert sum(r["failures_by_kind"]["timeout"] for r in rows) > 0  # some clients were late
    assert all(r["train_seconds_max"] <= 1.0 for r in rows if r["replies"])


def test_a_batch_whose_clients_all_fail_stops_each_run_as_alone(tiny_config, tmp_path):
    base = tiny_config("algorithm.name=moml", "faults.fail=1.0", "federated.rounds=5")
    cfgs = [replace_paths(base, {**values, "name": f"run{j}"}) for j, values in enumerate(PER_RUN)]
    run_batch_and_compare(cfgs, tmp_path)  # the summaries' status and message included
    summary = read_summary(tmp_path / "batch" / "run0")
    assert summary["status"] == "failed" and "InjectedFault" in summary["message"]


@pytest.mark.parametrize("participation", [
    ("participation.model=markov", "participation.markov_on_to_off=0.5",
     "participation.markov_off_to_on=0.3"),
    ("participation.model=heterogeneous",),
    ("federated.sampling=poisson", "federated.clients_per_round=0", "federated.fraction=0.4"),
], ids=["markov", "heterogeneous", "poisson"])
def test_a_batch_with_a_participation_model_equals_each_run_alone(tiny_config, tmp_path,
                                                                 participation):
    base = tiny_config("algorithm.name=moml", "federated.rounds=5", "federated.eval_every=2",
                       *participation)
    cfgs = [replace_paths(base, {**values, "name": f"run{j}"}) for j, values in enumerate(PER_RUN)]
    runs = run_batch_and_compare(cfgs, tmp_path)
    sizes = {len(r["clients"]) for run in runs for r in run[1:]}
    assert len(sizes) > 1  # the cohorts' sizes varied within and across runs
