"""``model.loss``: the task loss from the data (auto), a built-in one that must fit the data, or a
user's own function by import path (fedmaml/core/losses.py, docs/custom.md)."""

from __future__ import annotations

import pytest
import torch

from fedmaml.config import replace_path
from fedmaml.core.losses import cross_entropy, mse
from fedmaml.errors import ConfigError
from fedmaml.experiment import run_experiment
from fedmaml.federated.setup import setup_for
from fedmaml.results.recorder import read_metrics

import user_models

# a sinusoid (regression) run; alpha and eta explicit so the test can double them
BASE = ("algorithm.name=moml", "federated.rounds=4", "federated.eval_every=2",
        "algorithm.alpha=0.01", "algorithm.eta=0.005", "evaluation.alpha=0.01")


def test_auto_and_the_built_in_losses_follow_the_data(tiny_config):
    assert setup_for(tiny_config(*BASE)).loss_fn is mse
    assert setup_for(tiny_config(*BASE, "model.loss=mse")).loss_fn is mse
    digits = ("data.family=digits", "data.num_clients=4", "model.name=linear")
    assert setup_for(tiny_config(*digits)).loss_fn is cross_entropy
    assert setup_for(tiny_config(*digits, "model.loss=cross_entropy")).loss_fn is cross_entropy


def test_a_users_loss_is_the_one_that_trains(tiny_config, tmp_path):
    """Half of MSE with every step size doubled takes exactly MSE's steps: the same models. Had
    the user's loss been ignored, the doubled steps would give other models."""
    reference = tiny_config(*BASE)
    doubled = tiny_config(*BASE, "model.loss=user_models:half_squared_error",
                          "algorithm.alpha=0.02", "algorithm.eta=0.01", "evaluation.alpha=0.02")
    assert setup_for(doubled).loss_fn is user_models.half_squared_error
    models = {}
    for name, cfg in (("mse", reference), ("half", doubled),
                      ("half-vectorized", replace_path(doubled, "engine.name", "vectorized"))):
        run_dir = run_experiment(cfg, quiet=True, run_dir=tmp_path / name)
        models[name] = torch.load(run_dir / "model.pt", weights_only=True)
        rows = read_metrics(run_dir)
        assert rows[-1]["round"] == 4
    for k in models["mse"]:
        torch.testing.assert_close(models["half"][k], models["mse"][k], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(models["half-vectorized"][k], models["half"][k],
                                   rtol=1e-5, atol=1e-7)
    wrong = tiny_config(*BASE, "model.loss=user_models:half_squared_error")  # steps not doubled
    run_dir = run_experiment(wrong, quiet=True, run_dir=tmp_path / "not-doubled")
    final = torch.load(run_dir / "model.pt", weights_only=True)
    assert any(not torch.allclose(final[k], models["mse"][k]) for k in final)


@pytest.mark.parametrize("loss, message", [
    ("nope", r"model.loss: 'nope' is not allowed; allowed: auto, mse, cross_entropy, or an import "
             r"path"),
    ("cross_entropy", r"model.loss: cross_entropy needs integer labels \(classification\), but "
                      r"the data is regression"),
    ("user_models:no_such_loss", r"model.loss: module 'user_models' has no attribute "
                                 r"'no_such_loss'"),
    ("no_such_pkg.mod:f", r"model.loss: cannot import module 'no_such_pkg.mod'"),
    ("user_models:NOT_A_LOSS", r"model.loss: .* is a tuple, not a function"),
])
def test_a_bad_loss_is_refused_naming_the_key(tiny_config, loss, message):
    with pytest.raises(ConfigError, match=message):
        setup_for(tiny_config(*BASE, f"model.loss={loss}"))
