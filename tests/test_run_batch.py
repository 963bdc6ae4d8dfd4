"""Vectorized sweeps (fedmaml/engines/run_batch.py, ``fedmaml sweep --vectorize``): every run of a
batch equals the same run alone on the in-process engine (rows, evaluations, final model and every
client's memory, to float tolerance) for each algorithm, with seeds and the continuous
hyperparameters differing per run; a diverging run is stopped and masked while the others go on;
a batch interrupted after a random round resumes to the same end; runs that select their Lambda
pattern during training (central and federated) choose as alone and then train apart; the CLI
groups runs into batches and runs the others one by one, saying why."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch

from fedmaml.cli import main
from fedmaml.config import dump_yaml, replace_paths
from fedmaml.engines.batch_plan import batch_key, batch_refusal
from fedmaml.engines.run_batch import RunBatch
from fedmaml.federated import checkpoint
from fedmaml.results.metrics_row import MetricsRow
from fedmaml.results.recorder import MODEL_FILE, read_metrics, read_summary
from tests.test_checkpoint import stop_after  # noqa: F401 - a fixture
from tests.test_vectorized import (CASES, assert_close_values, assert_params_close,
                                   run_engine)

# Three runs of one setting that differ in everything a batch carries per run.
PER_RUN = ({"seed": 0, "algorithm.eta": 0.01, "algorithm.beta": 0.3, "algorithm.alpha": 0.01,
            "federated.server_lr": 1.0, "algorithm.hf_delta": 0.01},
           {"seed": 1, "algorithm.eta": 0.02, "algorithm.beta": 0.6, "algorithm.alpha": 0.02,
            "federated.server_lr": 0.5, "algorithm.hf_delta": 0.005},
           {"seed": 7, "algorithm.eta": 0.005, "algorithm.beta": 0.9, "algorithm.alpha": 0.005,
            "federated.server_lr": 2.0, "algorithm.hf_delta": 0.02})

BATCH_CASES = {
    **{k: CASES[k] for k in ("moml-full", "moml-mixed-so", "moml-head-hf", "moml-reinit",
                             "moml-public-protocol", "per_fedavg-hf", "per_fedavg-hf-normalized",
                             "fedmeta-so", "reptile", "fedavg", "silo-moml", "silo-fedmeta")},
    # LocalMOML: H > 1 local steps, memories kept between participations
    "local-moml": ("algorithm.name=moml", "algorithm.local_steps=3"),
    # MOML-V2: decay_to_w, one silo holding every task (B of them per step)
    "moml-v2-one-silo": ("algorithm.name=moml", "algorithm.memory_policy=decay_to_w",
                         "federated.mode=cross_silo", "federated.clients_per_round=0",
                         "data.num_clients=1",
                         "data.tasks_per_client=5", "algorithm.tasks_per_step=2"),
    # the query loss at w too: the row keeps loss_before before loss_after, as a run alone's
    "moml-loss-before": ("algorithm.name=moml", "algorithm.loss_before=true"),
    "adam-weighted": ("algorithm.name=moml", "federated.server_optimizer=adam",
                      "federated.aggregation=weighted", "federated.lr_decay_at=0.5",
                      "data.family=sinusoid", "data.tasks_per_client=2"),
}


def configs_of(tiny_config, tmp_path, overrides, per_run=PER_RUN):
    base = tiny_config(*overrides, "federated.rounds=4")
    return [replace_paths(base, {**values, "name": f"run{j}"}) for j, values in enumerate(per_run)]


def memories_of(batch: RunBatch, i: int) -> dict[int, dict[str, torch.Tensor]]:
    ids = batch.has_memory[i].nonzero()[0].tolist() if batch.memory else []
    return {c: {k: v[i, c] for k, v in batch.memory.items()} for c in ids}


#: What a pattern selection's record and summary hold of its timings (and the machine's load), which
#: differ from one measurement to the next; ``reason`` quotes the speedup.
SELECTION_TIMING = ("ms", "speedup", "timing", "reason", "chosen_ms", "chosen_speedup", "full_ms")


def timeless(record):
    """A pattern selection's record (or its summary) without its timings."""
    if isinstance(record, dict):
        return {k: timeless(v) for k, v in record.items() if k not in SELECTION_TIMING}
    return [timeless(r) for r in record] if isinstance(record, list) else record


def assert_equal_to_alone(cfg, batch_dir, alone_dir, memory=None):
    rows_a, model_a, mem_a, grid = run_engine(cfg, "inprocess", alone_dir)
    rows_b = read_metrics(batch_dir)
    assert len(rows_a) == len(rows_b) <= cfg.federated.rounds + 1
    for a, b in zip(rows_a, rows_b):
        for row in (a, b):  # each is a row of the one type, written as the type writes it
            assert list(MetricsRow.from_dict(row).as_dict()) == list(row), row["round"]
            if "pattern_selection" in row:
                row["pattern_selection"] = timeless(row["pattern_selection"])
        assert_close_values(a, b, f"{cfg.name} round {a['round']}")
    assert_params_close(model_a, torch.load(batch_dir / MODEL_FILE, weights_only=True),
                        f"{cfg.name}: final model")
    if memory is not None:
        assert mem_a.keys() == memory.keys(), cfg.name  # the same clients hold memories...
        for c in mem_a:  # ...and the same memories
            assert_params_close(mem_a[c], memory[c], f"{cfg.name}: memory of client {c}")
    sa, sb = read_summary(alone_dir), read_summary(batch_dir)
    assert_close_values({k: timeless(v) for k, v in sa.items() if k not in ("seconds", "batch")},
                        {k: timeless(v) for k, v in sb.items() if k not in ("seconds", "batch")},
                        f"{cfg.name}: summary")


@pytest.mark.parametrize("case", list(BATCH_CASES))
def test_every_run_of_a_batch_equals_the_run_alone(tiny_config, tmp_path, case):
    cfgs = configs_of(tiny_config, tmp_path, BATCH_CASES[case])
    batch = RunBatch(cfgs, [tmp_path / "batch" / c.name for c in cfgs])
    batch.run()
    assert "completed" in {s["status"] for s in batch.results.values()}
    for i, cfg in enumerate(cfgs):  # a run that diverges alone diverges alike in the batch
        assert read_summary(tmp_path / "batch" / cfg.name)["batch"]["runs"] == 3
        assert_equal_to_alone(cfg, tmp_path / "batch" / cfg.name, tmp_path / "alone" / cfg.name,
                              memories_of(batch, i))


def test_a_batch_warns_once_of_a_steps_key_its_written_out_pattern_overrides(tiny_config, tmp_path,
                                                                           caplog):
    # "01": one head step on the tiny MLP, in every run; evaluation.steps = 2 is for the aliases
    cfgs = configs_of(tiny_config, tmp_path, ("algorithm.name=moml", "evaluation.pattern=01"))
    with caplog.at_level(logging.WARNING, logger="fedmaml"):
        RunBatch(cfgs, [tmp_path / "batch" / c.name for c in cfgs]).run()
    warned = [r.getMessage() for r in caplog.records if "applies only to the aliases" in r.message]
    assert len(warned) == 1 and warned[0].startswith("evaluation.pattern: '01' is written out")
    assert {read_summary(tmp_path / "batch" / c.name)["eval_steps"] for c in cfgs} == {1}


@pytest.mark.slow
def test_a_compiled_batch_equals_the_runs_alone(tiny_config, tmp_path):
    """engine.compile: the batch's update over runs is torch.compile'd (as the vectorized engine's
    cohort update) and changes nothing but the time; eta decays in the run (a new value per run
    is a tensor input, not a constant to compile again for)."""
    cfgs = [replace_paths(c, {"engine.compile": True}) for c in configs_of(
        tiny_config, tmp_path, ("algorithm.name=moml", "federated.lr_decay_at=0.5",
                                "federated.clients_per_round=2", "data.num_clients=2",
                                "federated.eval_every=0"))]
    batch = RunBatch(cfgs, [tmp_path / "batch" / c.name for c in cfgs])
    batch.run()
    assert batch._runs_update._compiled not in (None, False)  # it compiled, and did not fall back
    for i, cfg in enumerate(cfgs):
        assert_equal_to_alone(cfg, tmp_path / "batch" / cfg.name, tmp_path / "alone" / cfg.name,
                              memories_of(batch, i))


def test_a_diverging_run_stops_alone_and_the_others_go_on(tiny_config, tmp_path):
    per_run = (PER_RUN[0], {**PER_RUN[1], "algorithm.eta": 1e6, "federated.server_lr": 1e6},
               PER_RUN[2])
    cfgs = configs_of(tiny_config, tmp_path, ("algorithm.name=moml", "federated.rounds=6"), per_run)
    cfgs = [replace_paths(c, {"federated.rounds": 6}) for c in cfgs]
    batch = RunBatch(cfgs, [tmp_path / "batch" / c.name for c in cfgs])
    batch.run()
    statuses = [batch.results[i]["status"] for i in range(3)]
    assert statuses == ["completed", "diverged", "completed"]
    diverged = read_summary(tmp_path / "batch" / "run1")
    assert "run diverged at round" in diverged["message"]
    assert diverged["rounds_completed"] < 6
    # it stopped where the run alone stops, with the same model (the last good one)...
    assert_equal_to_alone(cfgs[1], tmp_path / "batch" / "run1", tmp_path / "alone" / "run1")
    # ...and the runs it was batched with went on as if alone
    for i in (0, 2):
        assert_equal_to_alone(cfgs[i], tmp_path / "batch" / cfgs[i].name,
                              tmp_path / "alone" / cfgs[i].name, memories_of(batch, i))


def test_an_interrupted_batch_resumes_to_the_same_end(tiny_config, tmp_path, stop_after,  # noqa: F811
                                                     monkeypatch):
    overrides = ("algorithm.name=moml", "federated.server_optimizer=adam",
                 "federated.server_lr=0.01", "federated.eval_every=2")
    adam = [{**v, "federated.server_lr": lr} for v, lr in zip(PER_RUN, (0.01, 0.02, 0.005))]
    cfgs = [replace_paths(c, {"federated.rounds": 6})
            for c in configs_of(tiny_config, tmp_path, overrides, adam)]
    RunBatch(cfgs, [tmp_path / "full" / c.name for c in cfgs]).run()
    stop_at = random.randint(1, 5)
    stop_after(stop_at)
    cut = RunBatch(cfgs, [tmp_path / "cut" / c.name for c in cfgs])
    cut.run()
    monkeypatch.undo()
    for c in cfgs:
        summary = read_summary(tmp_path / "cut" / c.name)
        assert summary["status"] == "interrupted", stop_at
        assert checkpoint.load(tmp_path / "cut" / c.name)["round"] == stop_at
    resumed = RunBatch(cfgs, [tmp_path / "cut" / c.name for c in cfgs], resume=True)
    resumed.run()
    for i, c in enumerate(cfgs):
        full, cut_rows = read_metrics(tmp_path / "full" / c.name), read_metrics(tmp_path / "cut" / c.name)
        assert [r["round"] for r in cut_rows] == list(range(7)), stop_at
        for a, b in zip(full, cut_rows):
            assert_close_values({k: v for k, v in a.items() if k != "seconds"},
                                {k: v for k, v in b.items() if k != "seconds"}, f"round {a['round']}")
        assert read_summary(tmp_path / "cut" / c.name)["status"] == "completed"
        assert not checkpoint.path_of(tmp_path / "cut" / c.name).exists()
    # the resumed runs also equal the run alone
    assert_equal_to_alone(cfgs[0], tmp_path / "cut" / cfgs[0].name, tmp_path / "alone" / "run0",
                          memories_of(resumed, 0))


def test_one_run_of_a_batch_resumes_alone_on_the_vectorized_engine(tiny_config, tmp_path,
                                                                   stop_after):  # noqa: F811
    cfgs = [replace_paths(c, {"federated.rounds": 5, "engine.name": "vectorized"})
            for c in configs_of(tiny_config, tmp_path, ("algorithm.name=moml",))]
    stop_after(2)
    RunBatch(cfgs, [tmp_path / "cut" / c.name for c in cfgs]).run()
    from fedmaml.experiment import run_experiment

    stop_after(10 ** 6)
    run_experiment(cfgs[1], quiet=True, run_dir=tmp_path / "cut" / "run1", resume=True)
    assert read_summary(tmp_path / "cut" / "run1")["status"] == "completed"
    assert_equal_to_alone(cfgs[1], tmp_path / "cut" / "run1", tmp_path / "alone" / "run1")


@pytest.mark.parametrize("mode", ["central", "federated"])
def test_runs_of_a_batch_select_their_patterns_as_alone_and_train_apart(tiny_config, tmp_path,
                                                                         mode):
    # The choice is decided by quality, never by timing: candidates full and "none" (no adaptation,
    # 0 group-steps), epsilon 0, and a time tolerance so large that every qualifying candidate ties
    # and the selector's tie rule (fewest group-steps) picks "none" whenever it is no worse than
    # full. An evaluation step of 3 makes full adaptation overshoot (run1), so its run chooses
    # "none"; run0's small step chooses full (2 steps: its inner pattern changes from 11 to 11x2),
    # run2's is near the edge and chooses "none": after round 2 the batch trains two pattern groups.
    overrides = ("algorithm.name=moml", f"pattern_selection.mode={mode}",
                 "pattern_selection.at_round=2", "pattern_selection.family=false",
                 "pattern_selection.candidates=[none]", "pattern_selection.epsilon=0",
                 "pattern_selection.time_tolerance=1e9", "pattern_selection.validation_clients=3",
                 "pattern_selection.warmup=0", "pattern_selection.repeats=1")
    per_run = [{**v, "evaluation.alpha": a} for v, a in zip(PER_RUN, (0.01, 3.0, 0.02))]
    cfgs = configs_of(tiny_config, tmp_path, overrides, per_run)
    assert all(batch_refusal(c) is None for c in cfgs)
    batch = RunBatch(cfgs, [tmp_path / "batch" / c.name for c in cfgs])
    batch.run()
    chosen = []
    for i, cfg in enumerate(cfgs):
        batch_dir, alone_dir = tmp_path / "batch" / cfg.name, tmp_path / "alone" / cfg.name
        assert_equal_to_alone(cfg, batch_dir, alone_dir, memories_of(batch, i))
        files = [json.loads((d / "pattern_selection.json").read_text())
                 for d in (batch_dir, alone_dir)]
        assert_close_values(*(timeless(f) for f in files), f"{cfg.name}: pattern_selection.json")
        rows = read_metrics(batch_dir)
        assert [r["round"] for r in rows if "pattern_selection" in r] == [2]
        record = rows[2]["pattern_selection"]
        assert record["mode"] == mode and record["applied_to"] == ["eval-pattern",
                                                                   "inner-pattern",
                                                                   "memory-pattern"]
        chosen.append(record["chosen"])
    assert chosen == ["11x2", "none", "none"]


def test_what_a_batch_holds_and_refuses(tiny_config):
    base = tiny_config()
    same = replace_paths(base, {"seed": 3, "algorithm.eta": 0.5, "federated.server_lr": 0.1,
                                "evaluation.steps": 7, "tracking.backends": ["tensorboard"]})
    assert batch_key(base) == batch_key(same)
    assert batch_key(base) != batch_key(replace_paths(base, {"algorithm.local_steps": 2}))
    assert batch_refusal(base) is None
    # the clients' side runs in batches (the client library): faults, speeds, deadlines,
    # availability models and Poisson sampling (tests/test_batch_clients.py)
    assert batch_refusal(replace_paths(base, {"faults.fail": 0.1, "faults.dropout": 0.1,
                                              "federated.round_timeout": 5.0,
                                              "participation.speed": "lognormal"})) is None
    # the server round takes each run's privacy (tests/test_server_round.py)
    assert batch_refusal(replace_paths(base, {"privacy.clipping": "server",
                                              "privacy.clipping_norm": 1.0,
                                              "federated.aggregation": "uniform"})) is None
    assert batch_refusal(replace_paths(base, {"participation.model": "heterogeneous",
                                              "federated.sampling": "poisson"})) is None
    # each run selects its own Lambda pattern (see the test above)
    assert batch_refusal(replace_paths(base, {"pattern_selection.mode": "federated"})) is None
    assert batch_refusal(replace_paths(base, {"engine.device": "cuda"})) == "batches run on the CPU"
    with pytest.raises(ValueError, match="must share every setting"):
        RunBatch([base, replace_paths(base, {"model.hidden": [8], "name": "x"})], ["a", "b"])


def test_cli_sweep_vectorize_batches_runs_and_runs_the_rest_one_by_one(tiny_config, tmp_path,
                                                                       capsys):
    # a user module vmap cannot batch (tests/user_models.py) is what a batch still refuses
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(dump_yaml(tiny_config("algorithm.name=moml",
                                              "federated.aggregation=uniform")))
    args = ["sweep", str(cfg_file), "--grid", "algorithm.eta=0.01,0.02", "--grid",
            "model.name=user_models:Residual,user_models:Branchy", "--seeds", "0-1", "--vectorize",
            "--sweep-dir", str(tmp_path / "sw")]
    code = main([*args, "--progress-every", "1000"])
    err = capsys.readouterr()
    assert code == 0, err
    text = err.out + err.err
    assert "vectorized: 4 runs in 1 batch(es) of 4 runs; 4 run(s) one by one" in text
    assert "one by one (torch.func.vmap cannot batch the model (" in text
    dirs = sorted(p for p in (tmp_path / "sw").iterdir() if p.is_dir())
    assert len(dirs) == 8
    batched = [d for d in dirs if "Residual" in d.name]
    for d in dirs:
        summary = json.loads((d / "summary.json").read_text())
        assert summary["status"] == "completed"
        assert ("batch" in summary) == ("Residual" in d.name), d.name
        assert (d / "convergence.png").exists() and (d / MODEL_FILE).exists()
    assert batched
    # a second invocation finds every run finished; compare reads them as any sweep's
    assert main([*args, "--quiet"]) == 0
    assert "8 runs; 8 were finished already" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "sw"), "--out", str(tmp_path / "cmp")]) == 0


def test_train_configs_batches_reuses_finished_runs_and_refuses_a_changed_one(tiny_config,
                                                                             tmp_path):
    """The experiment scripts' entry (``fedmaml.sweep.train_configs``): runs of one shape train as a
    batch, a second call reuses every finished run, and a finished run whose config has since
    changed is an error naming the run and the key rather than a silently reused result."""
    from fedmaml.errors import FedmamlError
    from fedmaml.sweep import train_configs

    configs = configs_of(tiny_config, tmp_path, ("algorithm.name=moml",))
    errors = train_configs(configs)
    assert sorted(errors) == sorted(str(tmp_path / "runs" / c.name) for c in configs)
    assert all(e is None for e in errors.values())
    for c in configs:
        assert read_summary(tmp_path / "runs" / c.name)["batch"]["runs"] == len(configs)
    model = (tmp_path / "runs" / "run0" / MODEL_FILE).read_bytes()
    assert train_configs(configs) == {}  # nothing left to train
    assert (tmp_path / "runs" / "run0" / MODEL_FILE).read_bytes() == model
    changed = [replace_paths(configs[0], {"federated.eval_every": 3}), *configs[1:]]
    with pytest.raises(FedmamlError, match=r"run0.*federated\.eval_every"):
        train_configs(changed)


def test_compare_with_baselines_run_as_batches_of_their_own(tiny_config, tmp_path):
    # Each run's baseline is a run of its own (its directory under <run>/baselines/, its ledger),
    # trained in a batch with the other runs' baselines; each equals the same run alone.
    from fedmaml.experiment import baseline_config
    from fedmaml.sweep import train_configs

    cfgs = configs_of(tiny_config, tmp_path, ("algorithm.name=moml", "compare_with=[fedavg]"),
                      PER_RUN[:2])
    cfgs = [replace_paths(c, {"output_dir": str(tmp_path / "batch")}) for c in cfgs]
    assert train_configs(cfgs, vectorize=True) == {str(tmp_path / "batch" / c.name): None
                                                   for c in cfgs}
    for cfg in cfgs:
        run_dir = tmp_path / "batch" / cfg.name
        base = baseline_config(cfg, "fedavg")
        for c, d in ((cfg, run_dir), (base, run_dir / "baselines" / "fedavg")):
            assert read_summary(d)["batch"]["runs"] == 2, d  # trained in a batch of two
            assert_equal_to_alone(c, d, tmp_path / "alone" / c.name)
