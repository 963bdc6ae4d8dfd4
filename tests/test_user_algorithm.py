"""A user's own algorithm (fedmaml/algorithms/base.py, registry.py; docs/custom.md, "Your own
algorithm"): the documented Ditto, taken from the doc, on every engine, against a hand computation,
through checkpoints and sweeps; built-ins by import path; the errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from fedmaml.algorithms import Algorithm, Hyper, RoundData, client_update, get_algorithm
from fedmaml.algorithms.fedavg import FedAvg
from fedmaml.config import load_config, replace_paths
from fedmaml.core.params import Params
from fedmaml.core.task_step import StepConfig
from fedmaml.core.patterns import Pattern
from fedmaml.engines.batch_plan import batch_refusal
from fedmaml.engines.run_batch import RunBatch
from fedmaml.errors import ConfigError
from fedmaml.experiment import run_experiment
from fedmaml.federated.setup import setup_for
from fedmaml.results.recorder import MODEL_FILE, read_metrics
from helpers import single_thread  # noqa: F401  (autouse fixture)
from tests.test_checkpoint import stop_after  # noqa: F401  (a fixture)
from tests.test_checkpoint import without_timing
from tests.test_deployment import flwr_run_on_local_superlink, needs_ports
from tests.test_resume import interrupted, same_model
from tests.test_run_batch import assert_equal_to_alone
from tests.test_user_model import doc_files
from tests.test_vectorized import assert_close_values, assert_params_close, run_engine

DITTO = ("algorithm.name=my_ditto:Ditto", "algorithm.kwargs={lam: 0.5}", "evaluation.steps=0",
         "algorithm.alpha=0.05", "algorithm.eta=0.02")


@pytest.fixture
def my_ditto(tmp_path, monkeypatch):
    """docs/custom.md's my_ditto.py saved in a directory on this process's path and on
    PYTHONPATH (for Ray's workers); returns the module."""
    where = tmp_path / "user_code"
    where.mkdir()
    (where / "my_ditto.py").write_text(doc_files()["my_ditto.py"], encoding="utf-8")
    monkeypatch.syspath_prepend(str(where))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(where),
                                                                    os.environ.get("PYTHONPATH")])))
    monkeypatch.delitem(sys.modules, "my_ditto", raising=False)
    import my_ditto

    return my_ditto


def assert_same_runs(a, b) -> None:
    """Two runs' rows and final models equal to float rounding (engines sum in other orders)."""
    rows_a, rows_b = read_metrics(a), read_metrics(b)
    assert len(rows_a) == len(rows_b) and rows_a[-1]["round"] == 3
    for x, y in zip(rows_a, rows_b):
        assert x.get("clients") == y.get("clients")
        assert_close_values(x, y, f"round {x['round']}")
    assert_params_close(torch.load(a / MODEL_FILE, weights_only=True),
                        torch.load(b / MODEL_FILE, weights_only=True), "final model")


def test_the_documented_ditto_config_runs(my_ditto, tmp_path):
    (tmp_path / "my_ditto.yaml").write_text(doc_files()["my_ditto.yaml"], encoding="utf-8")
    cfg = load_config(tmp_path / "my_ditto.yaml", ["federated.rounds=2", "federated.eval_every=2",
                                                   f"output_dir={tmp_path / 'runs'}"])
    setup = setup_for(cfg)
    # (setups are cached per process: an earlier test's import of my_ditto may have built it)
    assert type(setup.algorithm).__qualname__ == "Ditto" and setup.algorithm.lam == 0.5
    assert isinstance(setup.algorithm, Algorithm) and isinstance(get_algorithm("moml"), Algorithm)
    run_dir = run_experiment(cfg, quiet=True, run_dir=tmp_path / "run")
    last = read_metrics(run_dir)[-1]
    assert last["round"] == 2 and last["failures"] == 0 and "seen.memory-loss.mean" in last["eval"]


def test_ditto_runs_alike_on_the_inprocess_and_vectorized_engines(my_ditto, tiny_config, tmp_path):
    cfg = tiny_config(*DITTO)
    rows_i, model_i, mem_i, _ = run_engine(cfg, "inprocess", tmp_path / "inprocess")
    rows_v, model_v, mem_v, grid = run_engine(cfg, "vectorized", tmp_path / "vectorized")
    assert_same_runs(tmp_path / "inprocess", tmp_path / "vectorized")
    assert grid.stats.vmapped_clients > 0 and grid.stats.fallbacks == 0  # vmapped, not looped
    assert mem_i.keys() == mem_v.keys() and mem_i  # personal models kept on the same clients
    for c in mem_i:
        assert_params_close(mem_i[c], mem_v[c], f"personal model of client {c}")
    grid.close()
    # the personal models are evaluated: memory-loss beside the global model's loss
    evals = [r["eval"] for r in rows_i if "eval" in r and r["round"] > 0]  # round 0: none yet
    assert evals and all("seen.memory-loss.mean" in e for e in evals), evals[-1].keys()


@pytest.mark.ray
@pytest.mark.slow
def test_ditto_runs_alike_on_ray(my_ditto, tiny_config, tmp_path, ray_guard):
    cfg = tiny_config(*DITTO, "engine.num_cpus=1")
    inprocess = run_experiment(cfg, quiet=True, run_dir=tmp_path / "inprocess")
    ray = run_experiment(replace_paths(cfg, {"engine.name": "ray"}), quiet=True,
                         run_dir=tmp_path / "ray")
    assert_same_runs(inprocess, ray)


def test_one_ditto_step_equals_a_hand_computation(my_ditto):
    """One client, one task, one step of a linear regression in float64: the global model takes
    FedAvg's step on support + query, the personal model its proximal step; gradients by hand."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 1, generator=g,
                                                                          dtype=torch.float64)
    w = {"W": torch.randn(1, 3, generator=g, dtype=torch.float64),
         "b": torch.randn(1, generator=g, dtype=torch.float64)}
    v0 = {"W": torch.randn(1, 1, 3, generator=g, dtype=torch.float64),
          "b": torch.randn(1, 1, generator=g, dtype=torch.float64)}

    class LinearModel:  # the StagedModel interface that loss_grad and query_loss use
        def forward(self, p, x_, start=0, stop=None):
            return x_ @ p["W"].T + p["b"]

    def grad(p):  # d/dp mean((xW^T + b - y)^2), by hand
        r = x @ p["W"].T + p["b"] - y
        return {"W": 2 * r.T @ x / len(x), "b": 2 * r.sum(0) / len(x)}

    eta, alpha, lam = 0.1, 0.05, 0.7
    step = StepConfig(alpha=alpha, beta=1.0, estimator="first_order",
                      inner_pattern=Pattern.parse("1"), memory_pattern=Pattern.parse("1"))
    hp = Hyper(step=step, eta=eta, support_size=2, query_size=4)
    one = lambda t: t.reshape(1, 1, *t.shape)  # noqa: E731 - axes [H, B]
    data = RoundData(torch.zeros(1, 1, dtype=torch.int64), (one(x[:2]), one(y[:2])),
                     (one(x[2:]), one(y[2:])))
    frozen = {k: t.clone() for k, t in {**w, **{"v" + k: t for k, t in v0.items()}}.items()}
    delta, memory, metrics = client_update(my_ditto.Ditto(lam=lam), LinearModel(), mse_loss, hp,
                                           w, v0, data)
    gw = grad(w)
    for k in w:
        torch.testing.assert_close(delta[k], -eta * gw[k], rtol=1e-12, atol=1e-14)
    v = {k: t[0] for k, t in v0.items()}
    gv = grad(v)
    for k in v:
        expected = v[k] - alpha * (gv[k] + lam * (v[k] - w[k]))
        torch.testing.assert_close(memory[k][0], expected, rtol=1e-12, atol=1e-14)
    v_new = {k: memory[k][0] for k in v}
    query_loss = ((x[2:] @ v_new["W"].T + v_new["b"] - y[2:]) ** 2).mean()
    torch.testing.assert_close(metrics["loss_after"], query_loss, rtol=1e-12, atol=1e-14)
    # its inputs are untouched
    for k, t in {**w, **{"v" + k: t for k, t in v0.items()}}.items():
        assert torch.equal(t, frozen[k]), k


def mse_loss(pred, y):
    return ((pred - y) ** 2).mean()


@pytest.mark.parametrize("path", ["fedmaml.algorithms.moml:MOML",
                                  "fedmaml.algorithms.reptile:Reptile"])
def test_a_builtin_by_import_path_gives_bitwise_the_run_by_name(tiny_config, tmp_path, path):
    name = "moml" if "MOML" in path else "reptile"
    by_name = run_experiment(tiny_config(f"algorithm.name={name}"), quiet=True,
                             run_dir=tmp_path / "name")
    by_path = run_experiment(tiny_config(f"algorithm.name={path}"), quiet=True,
                             run_dir=tmp_path / "path")
    assert ([without_timing(r) for r in read_metrics(by_name)]
            == [without_timing(r) for r in read_metrics(by_path)])
    assert same_model(by_name, by_path)


@pytest.mark.parametrize("overrides, message", [
    (("algorithm.name=no_such_package.mod:Algo",),
     r"algorithm.name: cannot import module 'no_such_package.mod'.*importable"),
    (("algorithm.name=fedmaml.algorithms.moml:Nope",),
     r"algorithm.name: module 'fedmaml.algorithms.moml' has no attribute 'Nope'"),
    (("algorithm.name=fedmaml.errors:ConfigError",),
     r"algorithm.name: 'fedmaml.errors:ConfigError' is a type, not an Algorithm"),
    (("algorithm.name=fedmaml.algorithms.base:Hyper",),
     r"algorithm.name: 'fedmaml.algorithms.base:Hyper' is a type, not an Algorithm"),
    (("algorithm.name=my_ditto:Ditto", "algorithm.kwargs={lambda: 0.5}"),
     r"algorithm.kwargs: my_ditto:Ditto takes no argument lambda; allowed: lam"),
    (("algorithm.name=my_ditto:Ditto", "algorithm.kwargs={lam: -1}"),
     r"algorithm.kwargs: my_ditto:Ditto rejected \{'lam': -1\}: lam must be a number >= 0"),
    (("algorithm.name=fedmaml.algorithms.moml:MOML", "algorithm.kwargs={beta: 1}"),
     r"algorithm.kwargs: .* is an Algorithm instance, which takes none"),
])
def test_bad_algorithms_and_kwargs_get_clear_errors(my_ditto, tiny_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        setup_for(tiny_config(*overrides))


def test_the_config_refuses_what_is_not_a_name_nor_a_path(tiny_config):
    with pytest.raises(ConfigError, match=r"algorithm.name: 'momll' is not allowed; allowed: "
                                          r"moml, .*import path 'package.module:Name'.*moml"):
        tiny_config("algorithm.name=momll")
    with pytest.raises(ConfigError, match=r"algorithm.kwargs: only for your own algorithm.*"
                                          r"algorithm.name is 'moml'"):
        tiny_config("algorithm.name=moml", "algorithm.kwargs={lam: 1}")
    with pytest.raises(ConfigError, match=r"algorithm.kwargs: expected a mapping"):
        tiny_config("algorithm.name=a.b:C", "algorithm.kwargs=[1, 2]")


def test_fedmaml_run_takes_an_algorithm_object(my_ditto, tiny_config, tmp_path):
    import fedmaml

    cfg = tiny_config("evaluation.steps=0", "algorithm.alpha=0.05", "algorithm.eta=0.02")
    by_class = fedmaml.run(cfg, algorithm=my_ditto.Ditto, run_dir=tmp_path / "class", quiet=True,
                           **{"algorithm.kwargs": {"lam": 0.5}})
    recorded = load_config(by_class / "config.yaml").algorithm
    assert (recorded.name, recorded.kwargs) == ("my_ditto:Ditto", '{"lam": 0.5}')
    by_path = run_experiment(tiny_config(*DITTO), quiet=True, run_dir=tmp_path / "path")
    assert ([without_timing(r) for r in read_metrics(by_class)]
            == [without_timing(r) for r in read_metrics(by_path)])
    # an instance lives in this process only: in-process runs it, Ray is refused up front
    instance = my_ditto.Ditto(lam=0.5)
    by_instance = fedmaml.run(cfg, algorithm=instance, run_dir=tmp_path / "instance", quiet=True)
    assert same_model(by_instance, by_path)
    with pytest.raises(ConfigError, match="algorithm is a Python object that lives only in this"):
        fedmaml.run(cfg, algorithm=instance, quiet=True, **{"engine.name": "ray"})


def test_a_ditto_run_resumes_bitwise(my_ditto, tiny_config, tmp_path, stop_after):  # noqa: F811
    run_dir, cfg = interrupted(tiny_config, tmp_path, stop_after, *DITTO, rounds=4, after=2)
    run_experiment(cfg, quiet=True, run_dir=run_dir, resume=True)
    full = run_experiment(cfg, quiet=True, run_dir=tmp_path / "full")
    assert [without_timing(r) for r in read_metrics(run_dir)] == [
        without_timing(r) for r in read_metrics(full)]
    assert same_model(full, run_dir)


def test_a_sweep_batch_of_ditto_runs_equals_each_run_alone(my_ditto, tiny_config, tmp_path):
    base = tiny_config(*DITTO, "federated.rounds=3")
    cfgs = [replace_paths(base, {"seed": s, "algorithm.eta": eta, "algorithm.alpha": a,
                                 "name": f"run{j}"})
            for j, (s, eta, a) in enumerate([(0, 0.02, 0.05), (3, 0.01, 0.02)])]
    assert all(batch_refusal(c) is None for c in cfgs)
    batch = RunBatch(cfgs, [tmp_path / "batch" / c.name for c in cfgs])
    batch.run()
    for cfg in cfgs:
        assert_equal_to_alone(cfg, tmp_path / "batch" / cfg.name, tmp_path / "alone" / cfg.name)


class WeightedMeanFedAvg(FedAvg):
    """FedAvg whose server rule is written out: the weighted mean, as the built-in one."""

    def server_update(self, stacked: Params, weights: torch.Tensor) -> Params:
        return {k: torch.tensordot(weights.to(v.dtype), v, dims=1) / weights.sum().to(v.dtype)
                for k, v in stacked.items()}


class MedianFedAvg(FedAvg):
    """FedAvg with the coordinate-wise median of the updates (a robust rule)."""

    def server_update(self, stacked: Params, weights: torch.Tensor) -> Params:
        return {k: v.median(0).values for k, v in stacked.items()}


def test_a_server_rule_replaces_the_mean_and_is_refused_where_it_cannot_run(tiny_config,
                                                                            tmp_path):
    here = __name__
    cfg = tiny_config("algorithm.name=fedavg", "federated.aggregation=weighted",
                      "data.tasks_per_client=2", "federated.rounds=2")
    mean = run_experiment(cfg, quiet=True, run_dir=tmp_path / "builtin")
    own = replace_paths(cfg, {"algorithm.name": f"{here}:WeightedMeanFedAvg"})
    written = run_experiment(own, quiet=True, run_dir=tmp_path / "written")
    assert_params_close(torch.load(mean / MODEL_FILE, weights_only=True),
                        torch.load(written / MODEL_FILE, weights_only=True), "weighted mean")
    median = run_experiment(replace_paths(cfg, {"algorithm.name": f"{here}:MedianFedAvg"}),
                            quiet=True, run_dir=tmp_path / "median")
    assert not same_model(mean, median)
    # a batch applies the rule run by run (fedmaml/federated/server_round.py): as each run alone
    runs = [replace_paths(cfg, {"algorithm.name": f"{here}:MedianFedAvg", "seed": s,
                                "name": f"median{s}"}) for s in (0, 1)]
    assert all(batch_refusal(c) is None for c in runs)
    RunBatch(runs, [tmp_path / "batch" / c.name for c in runs]).run()
    for c in runs:
        assert_equal_to_alone(c, tmp_path / "batch" / c.name, tmp_path / "alone" / c.name)
    with pytest.raises(ConfigError, match=r"own server rule .* differential privacy"):
        setup_for(replace_paths(own, {"privacy.clipping": "server",
                                      "privacy.clipping_norm": 1.0,
                                      "federated.aggregation": "uniform"}))


class UnreducedFedAvg(FedAvg):
    """A server rule that forgets to reduce: it returns the stacked updates ([n, ...])."""

    def server_update(self, stacked: Params, weights: torch.Tensor) -> Params:
        return dict(stacked)


def test_a_server_rule_returning_unreduced_updates_is_refused_by_name(tiny_config, tmp_path):
    """Broadcast into w, the stacked updates gave a run 'completed' with a model of the wrong
    shape; alone and in a batch, the run now fails naming the rule, the parameter and its shape."""
    cfg = tiny_config(f"algorithm.name={__name__}:UnreducedFedAvg", "federated.rounds=2")
    message = (r"algorithm\.name: UnreducedFedAvg\.server_update returned shape \[\d+, .*\] "
               r".* for parameter '.*'; it must be a floating tensor of the parameter's shape")
    with pytest.raises(ConfigError, match=message):
        run_experiment(cfg, quiet=True, run_dir=tmp_path / "alone")
    runs = [replace_paths(cfg, {"seed": s, "name": f"u{s}"}) for s in (0, 1)]
    with pytest.raises(ConfigError, match=message):
        RunBatch(runs, [tmp_path / "batch" / c.name for c in runs]).run()


def test_ditto_with_builtin_baselines(my_ditto, tiny_config, tmp_path):
    """compare_with runs built-in baselines beside it (without its kwargs)."""
    from fedmaml.results.recorder import read_summary

    cfg = tiny_config(*DITTO, "federated.rounds=2", "compare_with=fedavg")
    run_dir = run_experiment(cfg, quiet=True, run_dir=tmp_path / "ditto")
    assert read_summary(run_dir)["status"] == "completed"
    baselines = [p for p in run_dir.rglob("config.yaml") if p.parent != run_dir]
    assert [load_config(p).algorithm.name for p in baselines] == ["fedavg"]


class BranchyFedAvg(FedAvg):
    """FedAvg with a Python branch on a tensor's value, which vmap cannot batch."""

    def local_round(self, model, loss_fn, hp, w, memory, data):
        w, memory, metrics = super().local_round(model, loss_fn, hp, w, memory, data)
        if float(metrics["loss_after"]) > 1e30:  # data-dependent: fine one client at a time
            raise FloatingPointError("diverged")
        return w, memory, metrics


def _batching_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "fedmaml" and r.levelname == "WARNING"
            and r.getMessage().startswith("vectorized engine:")]


def test_an_algorithm_vmap_cannot_batch_runs_client_by_client_on_the_vectorized_engine(
        tiny_config, tmp_path, caplog):
    # vmap refuses the algorithm's op the same way for every cohort: the engine warns once and
    # trains every later cohort one client at a time, without trying vmap again; the run equals
    # the in-process one.
    import logging

    cfg = tiny_config(f"algorithm.name={__name__}:BranchyFedAvg")  # 3 rounds of 3 clients
    caplog.set_level(logging.WARNING, logger="fedmaml")
    _, _, _, grid = run_engine(cfg, "vectorized", tmp_path / "vectorized")
    grid.close()
    [warning] = _batching_warnings(caplog)
    assert "BranchyFedAvg" in warning and "vmap: It looks like you're calling .item()" in warning
    assert "such cohorts one client at a time from now on" in warning
    assert (grid.stats.fallbacks, grid.stats.vmapped_clients, grid.stats.per_client) == (1, 0, 9)
    run_engine(cfg, "inprocess", tmp_path / "inprocess")
    assert_same_runs(tmp_path / "inprocess", tmp_path / "vectorized")


class FailsOnceFedAvg(FedAvg):
    """FedAvg whose first update raises an error of its own (as a client's bad data would), not
    vmap's: one cohort runs one by one, the next ones batched again."""

    calls = 0

    def local_round(self, model, loss_fn, hp, w, memory, data):
        type(self).calls += 1
        if type(self).calls == 1:
            raise ValueError("a client's data could not be read")
        return super().local_round(model, loss_fn, hp, w, memory, data)


def test_an_error_that_is_not_vmaps_leaves_the_next_cohorts_batched(tiny_config, tmp_path,
                                                                      caplog):
    import logging

    cfg = tiny_config(f"algorithm.name={__name__}:FailsOnceFedAvg")
    FailsOnceFedAvg.calls = 0
    caplog.set_level(logging.WARNING, logger="fedmaml")
    _, _, _, grid = run_engine(cfg, "vectorized", tmp_path / "vectorized")
    grid.close()
    [warning] = _batching_warnings(caplog)
    assert "ValueError: a client's data could not be read" in warning
    assert "from now on" not in warning
    assert (grid.stats.fallbacks, grid.stats.per_client, grid.stats.vmapped_clients) == (1, 3, 6)


def test_cli_sweep_vectorize_batches_ditto_and_a_server_rule(
        my_ditto, tiny_config, tmp_path, capsys):
    import json

    from fedmaml.cli import main
    from fedmaml.config import dump_yaml

    median = (f"algorithm.name={__name__}:MedianFedAvg",)
    for name, overrides in (("ditto", DITTO), ("median", median)):
        cfg_file = tmp_path / f"{name}.yaml"
        cfg_file.write_text(dump_yaml(tiny_config(*overrides, "federated.rounds=2")))
        code = main(["sweep", str(cfg_file), "--grid", "algorithm.eta=0.01,0.02", "--seeds", "0",
                     "--vectorize", "--sweep-dir", str(tmp_path / name), "--progress-every",
                     "1000"])
        out = capsys.readouterr()
        assert code == 0, out
        text = out.out + out.err
        dirs = sorted(p for p in (tmp_path / name).iterdir() if p.is_dir())
        summaries = [json.loads((d / "summary.json").read_text()) for d in dirs]
        assert len(dirs) == 2 and all(s["status"] == "completed" for s in summaries)
        if name == "ditto":
            assert "vectorized: 2 runs in 1 batch(es) of 2 runs" in text, text
            assert all("batch" in s for s in summaries)
            # compare reads its runs; select-pattern picks an evaluation pattern for its w
            assert main(["compare", str(tmp_path / name), "--out", str(tmp_path / "cmp")]) == 0
            assert main(["select-pattern", str(dirs[0]), "pattern_selection.steps=1",
                         "--only-candidates", "--candidates", "01", "--quiet"]) == 0
            assert (dirs[0] / "pattern_selection_central.json").exists()
        else:  # the batch applies the rule run by run (fedmaml/federated/server_round.py)
            assert "vectorized: 2 runs in 1 batch(es) of 2 runs" in text, text
            assert all("batch" in s for s in summaries)


def test_a_sweep_and_a_run_set_one_kwarg_of_the_algorithm_by_its_dotted_key(
        my_ditto, tiny_config, tmp_path, capsys):
    """`--grid algorithm.kwargs.lam=...` trains Ditto once per lam, in directories named by it;
    `fedmaml run ... algorithm.kwargs.lam=...` sets it for one run."""
    import json

    from fedmaml.cli import main
    from fedmaml.config import dump_yaml

    cfg_file = tmp_path / "ditto.yaml"
    cfg_file.write_text(dump_yaml(tiny_config(*DITTO, "federated.rounds=2")))
    assert main(["sweep", str(cfg_file), "--grid", "algorithm.kwargs.lam=0.1,2", "--seeds", "0",
                 "--sweep-dir", str(tmp_path / "lams"), "--quiet"]) == 0, capsys.readouterr()
    summaries = {}
    for lam in (0.1, 2):
        run_dir = tmp_path / "lams" / f"algorithm.kwargs.lam={lam},seed=0"
        assert json.loads(load_config(run_dir / "config.yaml").algorithm.kwargs) == {"lam": lam}
        summaries[lam] = json.loads((run_dir / "summary.json").read_text())
        assert summaries[lam]["status"] == "completed"
    # lam pulls the personal models towards w: the runs differ in them
    assert (summaries[0.1]["after"]["seen.memory-loss.mean"]
            != summaries[2]["after"]["seen.memory-loss.mean"])
    assert main(["run", str(cfg_file), "algorithm.kwargs.lam=2", "--quiet",
                 "--output-dir", str(tmp_path / "one")]) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads(load_config(run_dir / "config.yaml").algorithm.kwargs) == {"lam": 2}
    assert (json.loads((run_dir / "summary.json").read_text())["after"]["seen.memory-loss.mean"]
            == summaries[2]["after"]["seen.memory-loss.mean"])


@needs_ports
@pytest.mark.deployment
@pytest.mark.slow
def test_ditto_on_the_offline_local_superlink(my_ditto, tmp_path):
    """`flwr run` of the Flower app with algorithm.name: my_ditto:Ditto: the SuperLink's processes
    import it from their PYTHONPATH, and the clients keep and are evaluated on their personal
    models."""
    _, rows = flwr_run_on_local_superlink(
        tmp_path, "algorithm.name='my_ditto:Ditto' data.num_clients=2 federated.rounds=2 "
                  "federated.eval_every=1 evaluation.steps=0", name="ditto",
        pythonpath=(Path(my_ditto.__file__).parent,))
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["failures"] == 0
    assert "seen.memory-loss.mean" in rows[2]["eval"]
