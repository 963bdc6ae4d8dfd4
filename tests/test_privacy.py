"""Differential privacy of the meta-updates (fedmaml/core/privacy.py, fedmaml/federated/privacy.py):
clipping bounds every update, the noise has the configured scale, the accountant's epsilon agrees
with published numbers, and a run records its budget in summary.json on every engine."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmaml.config import load_config
from fedmaml.core.privacy import (clip_stacked, clip_update, noise_generator, noise_std,
                                  private_mean, update_norms)
from fedmaml.errors import ConfigError


def _stacked(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 2, n)  # norms from far below to far above the bound
    return {"w": torch.randn(n, 5, 3, generator=g) * scales[:, None, None],
            "b": torch.randn(n, 3, generator=g) * scales[:, None]}


def test_clipping_bounds_every_update_and_keeps_small_ones():
    stacked, c = _stacked(12), 1.0
    clipped, norms = clip_stacked(stacked, c)
    whole = torch.cat([v.reshape(12, -1) for v in stacked.values()], 1).double().norm(dim=1)
    assert torch.allclose(norms, whole)  # the norm of the whole update, all tensors together
    after = update_norms(clipped)
    assert (after <= c * (1 + 1e-6)).all(), after
    for i in range(12):
        if norms[i] <= c:  # within the bound: untouched
            assert all(torch.equal(clipped[k][i], stacked[k][i]) for k in stacked)
        else:  # scaled down onto the bound, direction kept
            assert math.isclose(float(after[i]), c, rel_tol=1e-5)
            ratio = clipped["w"][i] / stacked["w"][i]
            assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-5)
    one = clip_update({k: v[-1] for k, v in stacked.items()}, c)
    assert all(torch.allclose(one[k], clipped[k][-1]) for k in stacked)


def test_private_mean_without_noise_is_the_clipped_sum_over_the_sampled_count():
    stacked, c = _stacked(4), 0.5
    mean, _ = private_mean(stacked, c, 0.0, num_sampled=6, generator=noise_generator(0, 1))
    clipped, _ = clip_stacked(stacked, c)
    for k in stacked:  # divided by the 6 clients asked, not the 4 that replied
        assert torch.allclose(mean[k], clipped[k].sum(0) / 6)
    with pytest.raises(ValueError, match="only 3 clients were sampled"):
        private_mean(stacked, c, 0.0, num_sampled=3, generator=noise_generator(0, 1))


def test_noise_has_the_configured_scale():
    # All-zero updates: the private mean is the noise alone. 400 000 coordinates; the sample std of
    # N draws of N(0, s^2) has relative standard error 1 / sqrt(2N) = 0.11 %, and the sample mean a
    # standard error of s / sqrt(N): 1 % on the std and 0.01 s on the mean are > 9 standard errors,
    # so this fails only if the scale is wrong (the seed is fixed, so the numbers never change).
    z, c, k = 1.3, 0.7, 5
    stacked = {"w": torch.zeros(k, 400, 500), "b": torch.zeros(k, 10)}
    mean, _ = private_mean(stacked, c, z, num_sampled=k, generator=noise_generator(7, 3))
    noise = torch.cat([v.flatten() for v in mean.values()]).double()
    expected = noise_std(z, c, k)
    assert expected == pytest.approx(z * c / k)
    assert float(noise.std()) == pytest.approx(expected, rel=0.01)
    assert abs(float(noise.mean())) < 0.01 * expected
    # Reproducible: a function of (seed, round); another round draws other noise.
    again, _ = private_mean(stacked, c, z, num_sampled=k, generator=noise_generator(7, 3))
    other, _ = private_mean(stacked, c, z, num_sampled=k, generator=noise_generator(7, 4))
    assert torch.equal(again["w"], mean["w"]) and not torch.equal(other["w"], mean["w"])


# -- the accountant ---------------------------------------------------------------------------------

# dp-accounting is in the test extra (pyproject.toml), so these run everywhere the tests do.

# TensorFlow Privacy's MNIST DP-SGD tutorial (tensorflow/privacy, tutorials/README.md, "Select
# Parameters"): 60 000 examples, batches of 256 (Poisson sampling, q = 256/60000), RDP orders
# 1.1..10.9 and 12..63, epsilon at delta = 1e-5 with the RDP-to-DP conversion of Mironov 2017
# (eps = min_a RDP(a) + log(1/delta) / (a - 1)). Published: noise 1.12 for 60 epochs -> 2.92;
# 0.6 for 30 epochs -> 9.74; 1.2 for 10 epochs -> 1.20 (two decimals).
TF_PRIVACY_TABLE = [(1.12, 60, 2.92), (0.6, 30, 9.74), (1.2, 10, 1.20)]
TUTORIAL_ORDERS = tuple([1 + x / 10 for x in range(1, 100)] + list(range(12, 64)))


@pytest.mark.parametrize("z, epochs, published", TF_PRIVACY_TABLE)
def test_flowers_rdp_accountant_reproduces_tf_privacys_published_epsilons(z, epochs, published):
    from flwr.supercore.privacy_accounting import (GaussianPrivacyEvent, NeighboringRelation,
                                                   PrivacyConfig, SamplingMethod)
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    n, batch, delta = 60000, 256, 1e-5
    acc = RdpAccountant(PrivacyConfig(delta, n, NeighboringRelation.ADD_OR_REMOVE_ONE,
                                      SamplingMethod.POISSON), orders=TUTORIAL_ORDERS)
    acc.compose(GaussianPrivacyEvent(z, batch, n), epochs * n // batch)
    rdp = np.asarray(acc._backend._rdp)  # the RDP curve the accountant composed
    orders = np.asarray(TUTORIAL_ORDERS)
    classic = float(np.min(rdp + math.log(1 / delta) / (orders - 1)))
    assert classic == pytest.approx(published, abs=0.02)  # published to two decimals
    # What fedmaml reports uses the accountant's tighter conversion (Canonne et al. 2020 / Asoodeh
    # et al. 2021): never above the classic one.
    assert acc.get_epsilon(delta) <= classic


def test_unsampled_rounds_are_composed_gaussian_mechanisms():
    """Cross-silo (every client every round): T releases of a Gaussian mechanism with noise
    multiplier z have RDP T*a/(2 z^2) (Mironov 2017, Prop. 7 and Prop. 1); the accountant converts
    it with eps = min_a RDP(a) + log((a-1)/a) - (log(delta) + log(a)) / (a-1)."""
    from fedmaml.federated.privacy import epsilon_after, make_accountant

    z, rounds, delta = 2.0, 50, 1e-5
    eps = epsilon_after(rounds, z, num_clients=10, clients_per_round=10, delta=delta)
    orders = np.asarray(make_accountant(delta, 10, 10)._orders)
    rdp = rounds * orders / (2 * z * z)
    by_formula = np.min(rdp + np.log((orders - 1) / orders)
                        - (math.log(delta) + np.log(orders)) / (orders - 1))
    assert eps == pytest.approx(float(by_formula), rel=1e-6)
    # Sampling 3 of the 10 clients a round amplifies privacy; more rounds spend more.
    sampled = epsilon_after(rounds, z, num_clients=10, clients_per_round=3, delta=delta)
    assert sampled < eps
    assert epsilon_after(2 * rounds, z, 10, 10, delta) > eps


# -- in runs ----------------------------------------------------------------------------------------

def test_privacy_config_rules():
    with pytest.raises(ConfigError, match="privacy.clipping: 'server' requires federated.aggregation"):
        load_config(None, ["privacy.clipping=server"])
    with pytest.raises(ConfigError, match="privacy.noise_multiplier: 1.0 needs a bound"):
        load_config(None, ["privacy.noise_multiplier=1.0", "federated.aggregation=uniform"])
    with pytest.raises(ConfigError, match="privacy.clipping"):
        load_config(None, ["privacy.clipping=edge"])
    # sampling amplification assumes uniform sampling: no account under other participation models
    with pytest.raises(ConfigError, match="privacy.noise_multiplier: the privacy account assumes "
                                          "uniform client sampling; participation.model is 'markov'"):
        load_config(None, ["privacy.noise_multiplier=1.0", "privacy.clipping=server",
                           "federated.aggregation=uniform", "participation.model=markov"])
    load_config(None, ["privacy.clipping=server", "federated.aggregation=uniform",
                       "participation.model=markov"])  # clipping alone claims no epsilon


def _model_step_norm(run_dir, tiny_config_params) -> float:
    w = torch.load(run_dir / "model.pt")
    return math.sqrt(sum(float((w[k] - tiny_config_params[k]).double().square().sum())
                         for k in tiny_config_params))


@pytest.mark.parametrize("engine", ["inprocess", "vectorized"])
def test_a_private_run_bounds_its_steps_and_records_its_budget(tiny_config, tmp_path, engine):
    from fedmaml.experiment import run_experiment
    from fedmaml.federated.privacy import epsilon_after
    from fedmaml.federated.setup import setup_for
    from fedmaml.results.recorder import read_summary

    c, z = 1e-4, 0.5
    dp = ["federated.aggregation=uniform", "privacy.clipping=server",
          f"privacy.clipping_norm={c}", f"engine.name={engine}"]
    cfg = tiny_config(*dp, "privacy.noise_multiplier=0", "name=clip")
    run = run_experiment(cfg, quiet=True)
    # Clipping only: each round moves w (server SGD, lr 1) by the mean of 3 clipped updates, at most
    # C; three rounds at most 3 C. Without clipping the same run moves w by far more.
    w0 = setup_for(cfg).initial_params
    assert _model_step_norm(run, w0) <= 3 * c * (1 + 1e-5)
    free = run_experiment(tiny_config(f"engine.name={engine}", "name=free"), quiet=True)
    assert _model_step_norm(free, w0) > 30 * c
    s = read_summary(run)["privacy"]
    assert s["updates_clipped"] == 9 and s["max_update_norm"] > c and s["epsilon"] is None

    # Client-side clipping, no noise: the same numbers (the server's clip is then a no-op).
    client = run_experiment(tiny_config(*dp, "privacy.clipping=client", "name=client"), quiet=True)
    got, want = torch.load(client / "model.pt"), torch.load(run / "model.pt")
    assert all(torch.allclose(got[k], want[k], rtol=1e-6, atol=1e-9) for k in want)
    assert read_summary(client)["privacy"]["updates_clipped"] == 0

    # With noise: epsilon after the 3 rounds of 3 of 6 clients, at delta, in summary.json.
    noisy = run_experiment(tiny_config(*dp, f"privacy.noise_multiplier={z}", "name=noisy"),
                           quiet=True)
    s = read_summary(noisy)["privacy"]
    assert s["releases"] == 3 and s["sampling"] == "without-replacement"
    assert s["epsilon"] == pytest.approx(epsilon_after(3, z, 6, 3, 1e-5))
    assert s["noise_std"] == pytest.approx(z * c / 3)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_engine_gives_the_same_private_run(tiny_config, tmp_path, ray_guard):
    """On Ray the clients clip in their own ClientApps and the server adds the same seeded noise:
    the same model and budget as in-process (Ray is the engine that costs a start-up, so one run)."""
    from fedmaml.config import replace_path
    from fedmaml.experiment import run_experiment
    from fedmaml.results.recorder import read_summary

    cfg = tiny_config("federated.aggregation=uniform", "privacy.clipping=client",
                      "privacy.clipping_norm=1e-4", "privacy.noise_multiplier=0.5",
                      "federated.rounds=2", "engine.num_cpus=1", "name=private")
    ray = run_experiment(replace_path(cfg, "engine.name", "ray"), quiet=True,
                         run_dir=tmp_path / "ray")
    local = run_experiment(cfg, quiet=True, run_dir=tmp_path / "inprocess")
    got, want = torch.load(ray / "model.pt"), torch.load(local / "model.pt")
    assert all(torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-9) for k in want)
    assert read_summary(ray)["privacy"]["epsilon"] == pytest.approx(
        read_summary(local)["privacy"]["epsilon"])
    assert read_summary(ray)["privacy"]["releases"] == 2
