"""Per-client compute speed (participation.speed): a multiplier on the simulated train time, a pure
function of (seed, client id); under a round deadline the clients it makes too slow are late, on
every engine."""

from __future__ import annotations

import numpy as np
import pytest

from fedmaml.client.speed import speed_multipliers
from fedmaml.config import ConfigError, ParticipationConfig, replace_path
from fedmaml.engines.inprocess import run_inprocess
from fedmaml.experiment import run_experiment
from fedmaml.federated import faults
from fedmaml.federated import records as R
from fedmaml.federated.client_app import make_client_app
from fedmaml.federated.server_app import make_server_app
from fedmaml.federated.setup import setup_for
from fedmaml.results.recorder import read_metrics
from test_faults import KeepingGrid


def test_multipliers_are_a_pure_function_of_seed_and_client_with_median_one_and_the_spread():
    spec, n = ParticipationConfig(speed="lognormal", speed_sigma=0.7), 20000
    m = speed_multipliers(spec, 5, np.arange(n))
    # the same client gets the same factor whoever else is asked, and in whatever order
    assert np.array_equal(speed_multipliers(spec, 5, [17, 3, 17]), m[[17, 3, 17]])
    assert not np.allclose(speed_multipliers(spec, 6, np.arange(100)), m[:100])
    logs = np.log(m)
    # log m ~ N(0, 0.7^2) over 20,000 clients: the sample median's standard deviation is
    # 0.7 * sqrt(pi / 2) / sqrt(n) = 0.0062 and the sample std's 0.7 / sqrt(2 n) = 0.0035; 5 of
    # them is a 6e-7 false alarm, while a wrong scale (e.g. sigma applied as variance) misses by 0.2.
    assert abs(np.median(logs)) < 5 * 0.0062
    assert abs(logs.std() - 0.7) < 5 * 0.0035
    # and it is normal: the share within one sigma is 0.6827 (binomial sd 0.0033)
    assert abs(np.mean(np.abs(logs) < 0.7) - 0.6827) < 5 * 0.0033
    assert np.array_equal(speed_multipliers(ParticipationConfig(), 5, [0, 9]), [1.0, 1.0])


def test_bad_speed_keys_are_refused_naming_the_key(tiny_config):
    with pytest.raises(ConfigError, match=r"participation.speed.*'gamma'.*uniform, lognormal"):
        tiny_config("participation.speed=gamma")
    with pytest.raises(ConfigError, match=r"participation.speed_sigma"):
        tiny_config("participation.speed=lognormal", "participation.speed_sigma=-1")


def test_without_a_deadline_speed_changes_only_the_reported_time(tiny_config, tmp_path):
    cfg = tiny_config("federated.eval_every=3")
    a = read_metrics(run_experiment(cfg, quiet=True, run_dir=tmp_path / "uniform"))
    b = read_metrics(run_experiment(replace_path(
        replace_path(cfg, "participation.speed", "lognormal"), "participation.speed_sigma", 3.0),
        quiet=True, run_dir=tmp_path / "lognormal"))
    keys = ("clients", "replies", "failures_by_kind", "loss_after", "samples")
    assert [{k: r.get(k) for k in keys} for r in a] == [{k: r.get(k) for k in keys} for r in b]
    assert a[-1]["eval"]["seen.loss.clients"] == b[-1]["eval"]["seen.loss.clients"]


# A deadline T and sigma 20: a measured train time of a tiny client lies between 1e-5 s and 30 s on
# any machine, so a client is surely late when its multiplier exceeds T / 1e-5 and surely on time
# below T / 30. The seed is the first whose six clients are all sure, some late, some not.
TIMEOUT = 1.0


def deadline_run(tiny_config, *more, timeout=TIMEOUT):
    spec = ParticipationConfig(speed="lognormal", speed_sigma=20.0)
    for seed in range(1000):
        m = speed_multipliers(spec, seed, np.arange(6))
        late, ok = m > timeout / 1e-5, m < timeout / 30
        if np.all(late | ok) and late.any() and ok.sum() >= 2:
            break
    cfg = tiny_config(f"seed={seed}", "participation.speed=lognormal",
                      "participation.speed_sigma=20", f"federated.round_timeout={timeout}",
                      "federated.rounds=4", "federated.eval_every=0", *more)
    return cfg, {int(c) for c in np.flatnonzero(late)}


def check_rows(rows, late, timeout=TIMEOUT):
    assert any(set(r["clients"]) & late for r in rows[1:])  # the test sees some late clients
    for row in rows[1:]:
        want = len(set(row["clients"]) & late)
        assert row["failures_by_kind"] == {"error": 0, "timeout": want, "malformed": 0}
        assert row["replies"] == len(row["clients"]) - want
        if row["replies"]:
            assert row["train_seconds_max"] <= timeout


def test_inprocess_marks_exactly_the_clients_over_the_deadline_late(tiny_config, tmp_path):
    cfg, late = deadline_run(tiny_config)
    setup = setup_for(cfg)
    num_nodes = setup.federation.num_clients + setup.federation.num_unseen
    app = make_client_app(cfg)
    grid = KeepingGrid(app, num_nodes)
    run_inprocess(make_server_app(cfg, tmp_path / "run", quiet=True), app, num_nodes, grid)
    marked = {int(m.content[R.METRICS][R.PARTITION]) for m in grid.replies
              if m.content[R.METRICS].get(faults.LATE, 0)}
    trained = {int(m.content[R.METRICS][R.PARTITION]) for m in grid.replies}
    assert marked == late & trained and trained - marked  # late ones still trained and replied
    check_rows(read_metrics(tmp_path / "run"), late)


def test_the_vectorized_cohort_drops_the_same_clients_as_inprocess(tiny_config, tmp_path):
    from fedmaml.engines.vectorized import VectorizedGrid

    cfg, late = deadline_run(tiny_config)
    a = read_metrics(run_experiment(cfg, quiet=True, run_dir=tmp_path / "inprocess"))
    b = read_metrics(run_experiment(replace_path(cfg, "engine.name", "vectorized"), quiet=True,
                                    run_dir=tmp_path / "vectorized"))
    check_rows(b, late)
    keys = ("clients", "replies", "failures_by_kind")
    assert [{k: r.get(k) for k in keys} for r in a] == [{k: r.get(k) for k in keys} for r in b]
    # which ones: a whole-federation cohort through the engine's batched path
    vcfg = replace_path(cfg, "engine.name", "vectorized")
    grid = VectorizedGrid(vcfg, make_client_app(vcfg), 8)
    setup = grid.setup
    result = grid.train_clients(setup.initial_params, setup.hyper, 1, list(range(6)), TIMEOUT)
    assert grid.stats.cohorts >= 1
    assert {c for c, kind, _ in result.failures if kind == "timeout"} == late
    assert set(result.cids) == set(range(6)) - late
    assert max(result.metrics["train-seconds"]) <= TIMEOUT


@pytest.mark.ray
@pytest.mark.slow
def test_the_ray_engine_counts_the_same_late_clients(tiny_config, tmp_path, ray_guard):
    # A generous real deadline (60 s): Ray's own clock must not drop a reply the speeds keep in time.
    cfg, late = deadline_run(tiny_config, "engine.name=ray", "engine.num_cpus=1", timeout=60.0)
    check_rows(read_metrics(run_experiment(cfg, quiet=True, run_dir=tmp_path / "ray")), late, 60.0)
