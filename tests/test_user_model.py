"""A user's own torch.nn.Module as the model (fedmaml/models/module.py, docs/custom.md).

The user modules live in tests/user_models.py. Equality with the built-in MLP and Conv-4 is checked
for the same weights on the core (every estimator, a Lambda pattern) and end to end on the engines.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import user_models
from fedmaml.config import load_config, replace_path, replace_paths
from fedmaml.core.adaptation import adapt
from fedmaml.core.losses import cross_entropy, mse
from fedmaml.core.patterns import Pattern
from fedmaml.core.task_step import StepConfig, task_step
from fedmaml.errors import ConfigError, PatternError
from fedmaml.experiment import run_experiment
from fedmaml.federated.setup import setup_for
from fedmaml.models.module import ModuleModel
from fedmaml.results.recorder import read_metrics, read_summary
from helpers import single_thread  # noqa: F401  (autouse fixture)
from helpers import OpCounter, cast, conv_batch, mlp_batch, small_conv, small_mlp
from tests.test_checkpoint import stop_after  # noqa: F401  (a fixture)


def as_user(model, module: nn.Module, name: str = "user") -> tuple[ModuleModel, dict, dict]:
    """The user module with the built-in model's weights: (model, built-in params, user params)."""
    builtin = cast(model.init(3))
    user = ModuleModel(user_models._copy_in(module.double(), builtin), name)
    return user, builtin, dict(zip(user.init(0), builtin.values()))


def assert_same(a: dict, b: dict) -> None:  # parameters in the same order, different names
    assert len(a) == len(b)
    for (ka, va), (kb, vb) in zip(a.items(), b.items()):
        torch.testing.assert_close(va, vb, rtol=1e-10, atol=1e-12, msg=f"{ka} vs {kb}")


@pytest.mark.parametrize("estimator", ["first_order", "second_order", "hessian_free"])
@pytest.mark.parametrize("kind", ["mlp", "conv4"])
def test_a_user_module_equal_to_a_builtin_gives_its_task_step(kind, estimator):
    if kind == "mlp":
        builtin = small_mlp()
        module = user_models.mlp_like((3,), 1, hidden=(6, 5, 4))
        batches, loss = [mlp_batch(s) for s in (1, 2, 3)], mse
        pattern = Pattern.parse("1111|0011|0001")
    else:
        builtin = small_conv()
        module = user_models.conv4_like((1, 12, 12), 3, width=4)
        batches, loss = [conv_batch(s) for s in (1, 2, 3)], cross_entropy
        pattern = Pattern.parse("11111|00011")
    user, w_b, w_u = as_user(builtin, module)
    assert user.staged and user.num_groups == builtin.num_groups
    cfg = StepConfig(alpha=0.05, beta=0.7, estimator=estimator, inner_pattern=pattern,
                     memory_pattern=pattern)
    u_b, g_b, m_b = task_step(builtin, loss, cfg, w_b, None, batches[0], batches[1], batches[2])
    u_u, g_u, m_u = task_step(user, loss, cfg, w_u, None, batches[0], batches[1], batches[2])
    assert_same(u_b, u_u)
    assert_same(g_b, g_u)
    torch.testing.assert_close(m_b["loss_after"], m_u["loss_after"])


def test_a_sequential_module_skips_the_frozen_prefix_like_the_builtin_conv4():
    user, _, w = as_user(small_conv(), user_models.conv4_like((1, 12, 12), 3, width=4))
    x, y = conv_batch(0)
    with OpCounter() as ops:
        adapt(user, w, x, y, cross_entropy, Pattern.parse("00001x3"), 0.1)
    # head only: the four conv blocks run once (cached), and no convolution is differentiated
    assert ops.counts["convolution"] == 4 and ops.counts["convolution_backward"] == 0


def test_a_module_that_is_not_a_sequence_runs_whole_and_stays_exact():
    torch.manual_seed(0)
    user = ModuleModel(user_models.Residual((3,), 1).double(), "residual")
    assert not user.staged and user.group_names == ("inp", "block", "head")
    w = cast(user.init(0))
    x, y = mlp_batch(1)
    pattern = Pattern.parse("111|001")
    got = adapt(user, w, x, y, mse, pattern, 0.1)
    # independent reference: full autograd, update multiplied by the pattern's mask
    ref = {k: v.clone().requires_grad_() for k, v in w.items()}
    for row in pattern.rows:
        loss = mse(torch.func.functional_call(user.module, ref, (x,)), y)
        grads = torch.autograd.grad(loss, list(ref.values()))
        ref = {k: (v - 0.1 * g * row[user._index[k]]).detach().requires_grad_()
               for (k, v), g in zip(ref.items(), grads)}
    assert_same(got, ref)


def test_groups_default_declared_and_invalid():
    torch.manual_seed(0)
    module = user_models.Residual((3,), 1)
    model = ModuleModel(module, "m", {"body": ["inp", "block"], "out": "head"})
    assert model.group_names == ("body", "out")
    assert model.group_params == (("inp.weight", "inp.bias", "block.weight", "block.bias"),
                                  ("head.weight", "head.bias"))
    with pytest.raises(ConfigError, match=r"exactly one group; in several groups: inp.weight "
                                          r"\(a, b\).*in no group: \['head.weight', 'head.bias'\]"):
        ModuleModel(module, "m", {"a": ["inp"], "b": ["inp.weight", "block"]})
    with pytest.raises(ConfigError, match=r"model.groups.a: prefixes \['tail'\] match no parameter"):
        ModuleModel(module, "m", {"a": ["inp", "block", "head", "tail"]})
    with pytest.raises(ConfigError, match=r"parameters \['scale'\] belong to no top-level child"):
        ModuleModel(user_models.WithScale((3,), 1), "m")
    declared = ModuleModel(user_models.WithScale((3,), 1), "m",
                           {"body": ["inp", "block"], "head": ["head", "scale"]})
    assert declared.num_groups == 2
    # declared groups that are consecutive runs of a Sequential's children stay staged
    seq = ModuleModel(user_models.mlp_like((3,), 1, (4, 4)), "s", {"body": ["0", "2"], "head": ["4"]})
    assert seq.staged and [len(s) for s in seq.stage_children] == [4, 1]


def test_pattern_errors_name_the_groups(tiny_config):
    cfg = tiny_config("model.name=user_models:Residual", "algorithm.inner_pattern=11|01")
    with pytest.raises(PatternError, match=r"algorithm.inner_pattern: .*2 bits per row but "
                                           r"user_models:Residual has 3 layer groups "
                                           r"\['inp', 'block', 'head'\]"):
        setup_for(cfg)


def test_bad_user_models_get_clear_errors(tiny_config):
    cases = {
        "user_models:nope": "module 'user_models' has no attribute 'nope'",
        "no_such_pkg.mod:f": "cannot import module 'no_such_pkg.mod'",
        "user_models:not_a_module": "returned a str, not a torch.nn.Module",
        # the factory's own refusal, with what it was given and where it raised
        "user_models:images_only": (r"model.name: calling user_models:images_only with "
                                    r"\{'input_shape': \[1\], 'num_outputs': 1\} raised ValueError: "
                                    r"expected images .*\(user_models.py, line \d+\)"),
        "user_models:CountsCalls": r"changes its buffers \['calls'\] in forward",
    }
    for name, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            setup_for(tiny_config(f"model.name={name}"))
    with pytest.raises(ConfigError, match=r"model.name: 'mpl' is not allowed; allowed: mlp, conv4, "
                                          r"linear, or an import path.*did you mean 'mlp'"):
        tiny_config("model.name=mpl")
    with pytest.raises(ConfigError, match=r"model.kwargs: only for your own module"):
        tiny_config("model.kwargs={width: 3}")
    with pytest.raises(ConfigError, match=r"calling user_models:Residual with .*'depth'"):
        setup_for(tiny_config("model.name=user_models:Residual", "model.kwargs={depth: 3}"))
    with pytest.raises(ConfigError, match=r"maps inputs \[3, 1\] to \[3, 2\]"):
        setup_for(tiny_config("model.name=user_models:Residual", "model.kwargs={num_outputs: 2}"))


def test_a_model_that_fails_on_the_data_is_told_which_data_it_was_given(tiny_config):
    # an image model on the default sinusoid data: the message names the data and the keys to set
    with pytest.raises(ConfigError) as info:
        setup_for(tiny_config("model.name=user_models:small_cnn"))
    message = str(info.value)
    assert message.startswith("model.name: user_models:small_cnn failed on a batch of inputs of "
                              "shape [3, 1] (RuntimeError: ")
    assert "given data.family=sinusoid, whose inputs have shape [1]" in message
    assert "set the data keys" in message and "data.family=digits" in message
    # the same model on image data builds
    setup_for(tiny_config("model.name=user_models:small_cnn", "data.family=digits"))
    # a bug of the module's own says where it is, and not that the data may be the cause
    with pytest.raises(ConfigError) as info:
        setup_for(tiny_config("model.name=user_models:TypoInForward"))
    message = str(info.value)
    assert "(NameError: name 'scael' is not defined; user_models.py, line " in message
    assert message.endswith("an error of the module's own code") and "data keys" not in message


def test_batchnorm_uses_batch_statistics_and_keeps_no_buffers():
    module = user_models.conv4_like((1, 12, 12), 3, width=4)
    model = ModuleModel(module, "c")
    assert dict(model.module.named_buffers()) == {}
    assert module[0][1].running_mean is not None  # the user's own module is left as it was
    x, _ = conv_batch(0)
    w = model.init(0)
    # a pure function: the same output twice, and equal to training-mode batch normalisation
    assert torch.equal(model(w, x.float()), model(w, x.float()))
    module.train()
    torch.testing.assert_close(model(w, x.float()), module(x.float()))


def test_the_initial_model_follows_the_seed(tiny_config):
    setup = setup_for(tiny_config("model.name=user_models:Residual", "model.init_seed=5"))
    again = setup_for(tiny_config("model.name=user_models:Residual", "model.init_seed=5",
                                  "name=other"))
    other = setup_for(tiny_config("model.name=user_models:Residual", "model.init_seed=6"))
    assert_same(setup.initial_params, again.initial_params)
    assert not torch.equal(setup.initial_params["inp.weight"], other.initial_params["inp.weight"])


def _runs_equal(a, b):
    from tests.test_engines import assert_rows_close, comparable

    rows_a, rows_b = read_metrics(a), read_metrics(b)
    assert [r["round"] for r in rows_a] == [0, 1, 2, 3]
    def numbers(row):  # message sizes differ with the parameter names ("layer1.weight", "0.weight")
        return {k: v for k, v in comparable(row).items() if not k.startswith("bytes")}

    for x, y in zip(rows_a, rows_b):
        assert_rows_close(numbers(x), numbers(y), f"round {x['round']}")
    ma = torch.load(a / "model.pt", weights_only=True)
    mb = torch.load(b / "model.pt", weights_only=True)
    for (ka, va), (kb, vb) in zip(ma.items(), mb.items(), strict=True):
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6, msg=f"{ka} vs {kb}")


@pytest.mark.parametrize("engine", ["inprocess", "vectorized"])
def test_a_user_mlp_trains_like_the_builtin_mlp(tiny_config, tmp_path, engine):
    cfg = tiny_config("algorithm.name=moml", "algorithm.inner_pattern=11|01",
                      f"engine.name={engine}")
    builtin = run_experiment(cfg, quiet=True, run_dir=tmp_path / "builtin")
    user_cfg = replace_paths(cfg, {"model.name": "user_models:mlp_with_builtin_init",
                                   "model.kwargs": {"hidden": [16]}})
    user = run_experiment(user_cfg, quiet=True, run_dir=tmp_path / "user")
    _runs_equal(builtin, user)


@pytest.mark.parametrize("module, reason", [("Branchy", "data-dependent control flow"),
                                             ("InPlace", "changes its input tensor in place")])
def test_the_vectorized_engine_refuses_what_vmap_cannot_batch_and_inprocess_runs_it(
        tiny_config, tmp_path, module, reason):
    cfg = tiny_config(f"model.name=user_models:{module}", "engine.name=vectorized")
    with pytest.raises(ConfigError, match=rf"vectorized engine cannot batch user_models:{module}.*"
                                          rf"{reason}.*use engine.name: inprocess or ray"):
        run_experiment(cfg, quiet=True, run_dir=tmp_path / "vectorized")
    done = run_experiment(replace_path(cfg, "engine.name", "inprocess"), quiet=True,
                          run_dir=tmp_path / "inprocess")
    assert read_metrics(done)[-1]["round"] == 3
    # an in-place change of the input reached a copy, not the clients' data (cached per process)
    data = setup_for(cfg).federation
    assert setup_for(cfg).model.copies_inputs == (module == "InPlace")
    xs = torch.cat([t.evaluation_split()[i] for c in range(data.num_clients)
                    for t in data.client_tasks(c) for i in (0, 2)])
    assert xs.abs().max() > 3  # sinusoid inputs lie in [-5, 5]; InPlace clamps to [-3, 3]


def test_fedmaml_run_takes_a_module_or_a_factory(tiny_config, tmp_path):
    import fedmaml

    cfg = tiny_config()
    # a factory importable by name is recorded by its import path
    run_dir = fedmaml.run(cfg, model=user_models.mlp_with_builtin_init, quiet=True,
                          run_dir=tmp_path / "factory", **{"model.kwargs": {"hidden": [16]}})
    recorded = load_config(run_dir / "config.yaml").model
    assert (recorded.name, recorded.kwargs) == ("user_models:mlp_with_builtin_init",
                                                '{"hidden": [16]}')
    builtin = run_experiment(cfg, quiet=True, run_dir=tmp_path / "builtin")
    _runs_equal(builtin, run_dir)
    # a module instance lives in this process only: in-process runs it, Ray is refused up front
    torch.manual_seed(0)
    module = user_models.Residual((1,), 1)
    run_dir = fedmaml.run(cfg, model=module, quiet=True, run_dir=tmp_path / "instance")
    assert read_metrics(run_dir)[-1]["round"] == 3
    with pytest.raises(ConfigError, match="lives only in this process"):
        fedmaml.run(cfg, model=module, quiet=True, **{"engine.name": "ray"})


def test_model_show_prints_groups_and_counts(capsys):
    from fedmaml.cli import main

    assert main(["model", "show", "user_models:Residual"]) == 0
    out = capsys.readouterr().out
    assert "3 layer groups" in out and "runs whole" in out
    assert "  1  block" in out and "272" in out and "total" in out and "321" in out


def doc_files() -> dict[str, str]:
    """The files docs/custom.md asks the reader to save (a ``<!-- file: NAME -->`` line, then a
    fenced block)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "custom.md").read_text(encoding="utf-8")
    return dict(re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", text, flags=re.S))


def test_the_documented_example_runs(tmp_path, monkeypatch, capsys):
    import re
    import sys
    from pathlib import Path

    from fedmaml.cli import main

    files = doc_files()
    assert set(files) == {"my_models.py", "my_model.yaml", "my_ditto.py", "my_ditto.yaml"}
    for name in ("my_models.py", "my_model.yaml"):  # my_ditto: tests/test_user_algorithm.py
        body = files[name]
        (tmp_path / name).write_text(body, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_models", raising=False)
    assert main(["model", "show", "my_model.yaml"]) == 0
    shown = capsys.readouterr().out
    doc = (Path(__file__).resolve().parents[1] / "docs" / "custom.md").read_text(encoding="utf-8")
    documented = re.search(r"```text\n(my_models:small_resnet.*?)```", doc, flags=re.S).group(1)
    assert shown == documented
    cfg = load_config(tmp_path / "my_model.yaml", ["federated.rounds=2", "federated.eval_every=2",
                                                    "data.num_clients=4", "data.unseen_clients=1",
                                                    f"output_dir={tmp_path / 'runs'}"])
    run_dir = run_experiment(cfg, quiet=True, run_dir=tmp_path / "run")
    rows = read_metrics(run_dir)
    assert rows[-1]["round"] == 2 and rows[-1]["failures"] == 0
    # its evaluation runs the steps it says (a written-out pattern would run its own rows)
    assert read_summary(run_dir)["eval_steps"] == cfg.evaluation.steps
    assert set(torch.load(run_dir / "model.pt", weights_only=True)) >= {"2.conv.weight", "7.bias"}


def test_a_sweep_batches_a_user_module_only_when_vmap_can(tiny_config):
    from fedmaml.engines.batch_plan import batch_refusal

    assert batch_refusal(tiny_config("model.name=user_models:Residual")) is None
    why = batch_refusal(tiny_config("model.name=user_models:Branchy"))
    assert why.startswith("torch.func.vmap cannot batch the model") and "control flow" in why


@pytest.mark.ray
@pytest.mark.slow
def test_a_user_mlp_on_ray_trains_like_the_builtin_mlp(tiny_config, tmp_path, ray_guard,
                                                        monkeypatch):
    import os
    from pathlib import Path

    # Ray's workers import the module by its path: put tests/ on their PYTHONPATH (pytest put it on
    # this process's sys.path only).
    here = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here,
                                                                    os.environ.get("PYTHONPATH")])))
    cfg = tiny_config("algorithm.name=moml", "engine.num_cpus=1")
    builtin = run_experiment(cfg, quiet=True, run_dir=tmp_path / "builtin")
    user_cfg = replace_paths(cfg, {"model.name": "user_models:mlp_with_builtin_init",
                                   "model.kwargs": {"hidden": [16]}, "engine.name": "ray"})
    user = run_experiment(user_cfg, quiet=True, run_dir=tmp_path / "ray")
    _runs_equal(builtin, user)


@pytest.mark.parametrize("ceil_mode", [True, False])
@pytest.mark.parametrize("size", [7, 8])
def test_the_fast_2x2_pool_equals_max_pool2d(ceil_mode, size):
    from fedmaml.models.module import _is_pool_2x2, _pool_2x2

    pool = nn.MaxPool2d(2, ceil_mode=ceil_mode)
    assert _is_pool_2x2(pool) and not _is_pool_2x2(nn.MaxPool2d(3)) and not _is_pool_2x2(
        nn.MaxPool2d(2, stride=1))
    h = torch.randn(3, 4, size, size, generator=torch.Generator().manual_seed(size))
    assert torch.equal(_pool_2x2(pool, h), pool(h))


def test_second_order_through_a_module_that_runs_whole_is_exact():
    torch.manual_seed(0)
    user = ModuleModel(user_models.Residual((3,), 1).double(), "residual")
    w = cast(user.init(0))
    (xs, ys), (xq, yq) = mlp_batch(1), mlp_batch(2)
    pattern, alpha = Pattern.parse("111|011|001"), 0.1
    cfg = StepConfig(alpha=alpha, beta=1.0, estimator="second_order", inner_pattern=pattern,
                     memory_pattern=pattern)
    _, g, _ = task_step(user, mse, cfg, w, None, (xs, ys), (xq, yq))
    # independent reference: MAML by hand, the update multiplied by the pattern's mask
    w0 = {k: v.clone().requires_grad_() for k, v in w.items()}
    theta = dict(w0)
    for row in pattern.rows:
        loss = mse(torch.func.functional_call(user.module, theta, (xs,)), ys)
        grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
        theta = {k: v - alpha * gr * row[user._index[k]] for (k, v), gr in zip(theta.items(), grads)}
    query = mse(torch.func.functional_call(user.module, theta, (xq,)), yq)
    ref = dict(zip(w0, torch.autograd.grad(query, list(w0.values()))))
    assert_same(g, ref)


def test_a_run_of_a_user_module_resumes_bitwise(tiny_config, tmp_path, stop_after):  # noqa: F811
    from tests.test_resume import interrupted, same_model
    from tests.test_checkpoint import without_timing

    extra = ("model.name=user_models:Residual", "model.kwargs={width: 8}")
    run_dir, cfg = interrupted(tiny_config, tmp_path, stop_after, *extra, rounds=4, after=2)
    run_experiment(cfg, quiet=True, run_dir=run_dir, resume=True)
    full = run_experiment(cfg, quiet=True, run_dir=tmp_path / "full")
    assert [without_timing(r) for r in read_metrics(run_dir)] == [
        without_timing(r) for r in read_metrics(full)]
    assert same_model(full, run_dir)


def _earlier_draws(seed: int, layers: list[tuple[str, tuple[int, ...], int, bool]]) -> dict:
    """The initial parameters fedmaml's built-ins have drawn since their first release, computed
    here independently: per layer in order, weight then bias ~ (rand * 2 - 1) * bound with
    bound = 1 / sqrt(fan_in) (bitwise: that rounding), from one generator, then (conv) the BatchNorm
    affine as ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape, fan_in, bn in layers:
        bound = 1 / math.sqrt(fan_in)
        out[f"{name}.weight"] = (torch.rand(*shape, generator=g) * 2 - 1) * bound
        out[f"{name}.bias"] = (torch.rand(shape[0], generator=g) * 2 - 1) * bound
        if bn:
            out[f"{name}.bn_weight"], out[f"{name}.bn_bias"] = torch.ones(shape[0]), torch.zeros(shape[0])
    return out


def test_the_builtins_are_modules_on_the_users_path_with_their_earlier_names_and_draws():
    """One path: mlp and conv4 are ModuleModels of nn.Sequential modules, yet model.pt names and a
    seed's initial values are those of earlier runs, and the forward is the plain functional ops."""
    state = torch.get_rng_state()
    net, conv = small_mlp(), small_conv()
    net.init(1), conv.init(1)
    assert torch.equal(torch.get_rng_state(), state)  # building draws nothing from torch's generator
    assert isinstance(net, ModuleModel) and isinstance(conv, ModuleModel)
    assert type(net.module) is nn.Sequential and type(conv.module) is nn.Sequential
    assert net.staged and conv.staged
    assert net.group_names == ("layer1", "layer2", "layer3", "layer4")
    assert conv.group_names == ("conv1", "conv2", "conv3", "conv4", "head")
    mlp_layers = [(f"layer{i + 1}", (o, n), n, False) for i, (n, o) in enumerate([(3, 6), (6, 5), (5, 4), (4, 1)])]
    conv_layers = [(f"conv{i + 1}", (4, 1 if i == 0 else 4, 3, 3), 9 * (1 if i == 0 else 4), True)
                   for i in range(4)] + [("head", (3, 4), 4, False)]  # 12 -> 6 -> 3 -> 2 -> 1
    for model, layers in ((net, mlp_layers), (conv, conv_layers)):
        for seed in (0, 7):
            got, want = model.init(seed), _earlier_draws(seed, layers)
            assert list(got) == list(want)  # names and order, as model.pt and checkpoints hold them
            assert all(torch.equal(got[k], want[k]) for k in want), model.name
    assert conv.group_params[0] == ("conv1.weight", "conv1.bias", "conv1.bn_weight", "conv1.bn_bias")

    p = cast(conv.init(3))
    x, _ = conv_batch(5)
    h = x
    for i in range(1, 5):
        h = F.conv2d(h, p[f"conv{i}.weight"], p[f"conv{i}.bias"], padding=1)
        h = F.batch_norm(h, None, None, p[f"conv{i}.bn_weight"], p[f"conv{i}.bn_bias"], training=True)
        h = F.max_pool2d(F.relu(h), 2, ceil_mode=True)
    want = F.linear(h.flatten(1), p["head.weight"], p["head.bias"])
    assert torch.equal(conv(p, x), want)
    assert torch.equal(conv(p, conv(p, x, 0, 3), 3), want)  # a cached prefix, then the rest
