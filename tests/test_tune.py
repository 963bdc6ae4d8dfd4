"""``fedmaml tune`` (docs/tuning.md): the space and metric parsers with their errors, the selection
rules on synthetic curves, successive halving's promotion, the searches, and real tiny tuning runs
(rungs, resume after a stop mid-batch, the tuned YAML running)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmaml.cli import main
from fedmaml.config import dump_yaml, load_config
from fedmaml.errors import ConfigError
from fedmaml.tune.halving import promoted, rungs_for
from fedmaml.tune.metric import parse_metric
from fedmaml.tune.search import GridSearch, RandomSearch, make_search
from fedmaml.tune.selection import Candidate, SeedResult, choose, late_rise
from fedmaml.tune.space import parse_space, parse_space_arg
from fedmaml.tune.tuner import Tuner, TuneSpec


# -- the space -------------------------------------------------------------------------------------

def test_space_kinds_grid_sample_and_edges():
    eta = parse_space_arg("eta=log:1e-3:1e-1")
    assert (eta.key, eta.kind, eta.low, eta.high) == ("algorithm.eta", "log", 1e-3, 1e-1)
    assert eta.grid(3) == (0.001, 0.01, 0.1)  # log-spaced
    beta = parse_space_arg("algorithm.beta=lin:0.1:0.9")
    assert beta.grid(5) == (0.1, 0.3, 0.5, 0.7, 0.9)
    steps = parse_space_arg("local_steps=int:1:3")
    assert (steps.key, steps.grid(5)) == ("algorithm.local_steps", (1, 2, 3))
    hidden = parse_space_arg("model.hidden=[40,40],[20]")
    assert hidden.kind == "choice" and hidden.choices == ((40, 40), (20,)) or \
        hidden.choices == ([40, 40], [20])
    rng = np.random.default_rng(0)
    for _ in range(200):
        v = eta.sample(rng)
        assert 1e-3 <= v <= 1e-1 and v == float(f"{v:.3g}")
        assert steps.sample(rng) in (1, 2, 3)
    # edges: the ends of a range (log space for log ranges) and the extreme numeric choices
    assert eta.edge(0.001) == "lower" and eta.edge(0.1) == "upper" and eta.edge(0.01) is None
    assert eta.edge(0.0012) == "lower"  # log-position 0.04
    choice = parse_space_arg("eta=0.1,0.05,0.01")
    assert [choice.edge(v) for v in (0.1, 0.05, 0.01)] == ["upper", None, "lower"]
    space = parse_space(["eta=0.1,0.01", "beta=0.3,0.5"])
    assert space.grid(5) == [{"algorithm.eta": 0.1, "algorithm.beta": 0.3},
                             {"algorithm.eta": 0.1, "algorithm.beta": 0.5},
                             {"algorithm.eta": 0.01, "algorithm.beta": 0.3},
                             {"algorithm.eta": 0.01, "algorithm.beta": 0.5}]


@pytest.mark.parametrize("text, words", [
    ("eta", ["KEY=log:LO:HI"]),
    ("eta=", ["KEY=log:LO:HI"]),
    ("eta=exp:1:2", ["unknown range kind 'exp'", "log:LO:HI"]),
    ("eta=log:0.1", ["two bounds"]),
    ("eta=log:a:1", ["'a'", "numbers"]),
    ("eta=log:0.1:0.01", ["LO must be below HI"]),
    ("eta=log:0:0.1", ["LO > 0", "lin:0:0.1"]),
    ("federated.rounds=lin:1:9", ["integer key takes int:LO:HI"]),
    ("eta=int:0.5:2", ["integers"]),
    ("eta=lin:-1:0.1", ["algorithm.eta"]),  # the key's own range
    ("no_such_key=lin:0:1", ["no_such_key"]),
    ("seed=0,1", ["--space seed", "--seeds"]),
    ("beta=0.1,abc", ["--space 'beta=0.1,abc'", "algorithm.beta", "'abc'"]),  # a listed value
])
def test_space_errors_name_the_argument_and_what_is_allowed(text, words):
    with pytest.raises(ConfigError) as e:
        parse_space_arg(text)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_space_refuses_a_key_twice_and_an_empty_space():
    # a value twice: named with its key, also when written differently (0.10 is 0.1)
    with pytest.raises(ConfigError, match=r"algorithm.eta lists 0.1 more than once"):
        parse_space_arg("eta=0.1,0.05,0.10")
    with pytest.raises(ConfigError, match=r"local_steps lists 1 more than once"):
        parse_space_arg("local_steps=1,2,1")
    with pytest.raises(ConfigError, match=r"model.hidden lists \[40\] more than once"):
        parse_space_arg("model.hidden=[40],[20],[40]")
    with pytest.raises(ConfigError, match="algorithm.eta is given twice"):
        parse_space(["eta=0.1,0.2", "algorithm.eta=log:1e-3:1e-1"])
    with pytest.raises(ConfigError, match="at least one --space"):
        parse_space([])


# -- the metric ------------------------------------------------------------------------------------

def test_metric_key_and_client_subset():
    m = parse_metric("unseen.loss@30-32")
    assert (m.key, m.clients, m.direction) == ("unseen.loss", (30, 31, 32), "min")
    ev = {"unseen.ids": [25, 30, 31, 32], "unseen.loss.clients": [9.0, 1.0, 2.0, 6.0],
          "unseen.loss.mean": 4.5}
    assert m.value(ev) == 3.0  # the test client 25 is left out
    assert parse_metric("unseen.loss.mean").value(ev) == 4.5
    assert parse_metric("seen.accuracy.mean").direction == "max"
    assert parse_metric("seen.accuracy.mean", "min").direction == "min"
    with pytest.raises(ConfigError, match="client 33 is not among the evaluated unseen clients"):
        parse_metric("unseen.loss@31-33").value(ev)
    # metrics.jsonl writes NaN as null (a diverged run; a client without a memory): NaN, not an
    # error; a chosen client whose evaluation failed that round makes the value NaN too
    nan_ev = {"unseen.ids": [30, 31], "unseen.loss.clients": [1.0, None],
              "unseen.loss.mean": None}
    assert math.isnan(parse_metric("unseen.loss.mean").value(nan_ev))
    assert math.isnan(parse_metric("unseen.loss@30-31").value(nan_ev))
    assert parse_metric("unseen.loss@30").value(nan_ev) == 1.0
    assert parse_metric("seen.loss.mean").value(nan_ev) is None  # not in the row
    failed = {"unseen.ids": [30, 32], "unseen.loss.clients": [1.0, 6.0], "eval-failures": 1}
    assert math.isnan(m.value(failed))
    with pytest.raises(ConfigError, match="GROUP.METRIC before the @"):
        parse_metric("unseen.loss.mean@1")
    with pytest.raises(ConfigError, match="not a seed list"):
        parse_metric("unseen.loss@x")


@pytest.mark.parametrize("ids, label", [("30-49", "30-49"), ("1,3,5-7,9-10", "1,3,5-7,9,10"),
                                        ("2,4-6,8,9,11", "2,4-6,8,9,11"), ("7", "7")])
def test_metric_label_writes_runs_as_ranges_and_reads_back(ids, label):
    # The report and the figure axes show the label; twenty ids written out did not fit an axis.
    m = parse_metric(f"unseen.loss@{ids}")
    assert m.label == f"unseen.loss@{label}"
    assert parse_metric(m.label).clients == m.clients
    assert m.text.count(",") == len(m.clients) - 1  # the manifest keeps every id


# -- selection on synthetic curves ---------------------------------------------------------------

def _cand(i, finals_curves, status="completed", rounds=100, params=None):
    runs = [SeedResult(s, status if isinstance(status, str) else status[s], rounds, curve)
            for s, curve in enumerate(finals_curves)]
    return Candidate(i, params or {"algorithm.eta": 0.01 * (i + 1)}, runs)


def _curve(*values):
    """Evaluations at rounds 0, 20, ..., 100."""
    return [(20 * k, v) for k, v in enumerate(values)]


def test_late_rise_is_final_over_best_after_half_the_budget():
    # best after half the budget (rounds >= 50: 60, 80, 100) is 0.4; the early 0.1 does not count
    assert late_rise(_curve(5, 0.1, 1, 0.4, 0.5, 0.6), 100, "min") == pytest.approx(1.5)
    assert late_rise(_curve(0.1, 0.5, 0.7, 0.8, 0.9, 0.85), 100, "max") == pytest.approx(0.9 / 0.85)


def test_selection_excludes_divergence_and_late_rise_and_reports_margin():
    stable = _cand(0, [_curve(5, 2, 1, 0.5, 0.45, 0.44), _curve(5, 2, 1, 0.6, 0.5, 0.5)])
    # the best single seed, but the other seed collapses late (0.4 -> 2.0): not chosen
    collapse = _cand(1, [_curve(5, 1, 0.5, 0.3, 0.25, 0.2), _curve(5, 1, 0.5, 0.4, 1.5, 2.0)])
    diverged = _cand(2, [_curve(5, 0.1), _curve(5, 0.1, 0.1, 0.1, 0.1, 0.1)],
                     status={0: "diverged", 1: "completed"})
    runner = _cand(3, [_curve(5, 2, 1, 0.6, 0.55, 0.5), _curve(5, 2, 1, 0.6, 0.55, 0.52)])
    stopped = _cand(4, [_curve(5, 0.01), _curve(5, 0.01)], status="interrupted", rounds=20)
    ch = choose([stable, collapse, diverged, runner, stopped], 100, "min")
    assert ch.chosen is stable and ch.runner_up is runner
    assert ch.margin == pytest.approx(0.51 - 0.47)
    assert "rises late on seed 1" in collapse.excluded and "1.0" not in collapse.excluded[:0]
    assert "diverged on seed 0" in diverged.excluded
    assert "successive halving" in stopped.excluded
    assert ch.ranked[:2] == [stable, runner]
    # the margin (0.04) exceeds both spreads (0.04, 0.014)? stable's std is 0.0424: within noise
    assert ch.within_noise == (0.04 < max(stable.spread, runner.spread))


def test_selection_flags_a_choice_at_the_edge_and_has_no_choice_when_none_is_eligible():
    space = parse_space(["eta=0.1,0.01,0.001"])
    edge = _cand(0, [_curve(5, 1, 0.5), _curve(5, 1, 0.5)], params={"algorithm.eta": 0.001})
    inner = _cand(1, [_curve(5, 1, 0.6), _curve(5, 1, 0.6)], params={"algorithm.eta": 0.01})
    ch = choose([edge, inner], 40, "min", edges_of=space.edges)
    assert ch.chosen is edge and ch.edges == {"algorithm.eta": "lower"}
    assert "AT THE EDGE" in ch.describe()
    bad = _cand(2, [_curve(5, 1, 0.5), _curve(5, 1, 0.5)], status="diverged")
    none = choose([bad], 40, "min")
    assert none.chosen is None and "no candidate is eligible" in none.describe()


# -- successive halving --------------------------------------------------------------------------

def test_rungs_snap_to_evaluation_rounds():
    assert rungs_for(40000, 2500, 3, 3) == [5000, 15000, 40000]  # 4444, 13333: the next evaluations
    assert rungs_for(100, 10, 1, 3) == [100]
    with pytest.raises(ConfigError, match="federated.eval_every is 0"):
        rungs_for(100, 0, 2, 3)
    with pytest.raises(ConfigError, match="same evaluation rounds"):
        rungs_for(100, 50, 4, 2)


def test_halving_keeps_the_top_fraction_across_batches():
    scores = {0: 0.5, 1: 0.1, 2: math.nan, 3: 0.3, 4: 0.2, 5: 0.9}
    assert promoted([0, 1, 2, 3, 4, 5], scores, 3, "min") == [1, 4]  # ceil(6 / 3) = 2
    assert promoted([0, 1, 2, 3, 4, 5], scores, 2, "max") == [0, 3, 5]
    # ASHA: a later batch's candidate goes on only if it is in the top third of all so far
    scores.update({6: 0.15, 7: 0.8, 8: 0.05})
    assert promoted([6, 7, 8], scores, 3, "min") == [6, 8]  # top 3 of 9: 8, 1, 6
    assert promoted([2], {2: math.nan}, 3, "min") == []  # diverged: never


# -- searches --------------------------------------------------------------------------------------

def test_grid_and_random_searches():
    space = parse_space(["eta=log:1e-3:1e-1", "beta=0.3,0.5"])
    grid = GridSearch(space, "min", 0, 3)
    assert grid.size() == 6 and len(grid.ask(4)) == 4 and len(grid.ask(4)) == 2
    assert grid.exhausted()
    a, b = RandomSearch(space, "min", 7), RandomSearch(space, "min", 7)
    first = a.ask(5)
    for p in first:
        b.note_asked(p)
    assert a.ask(3) == b.ask(3)  # a resumed search draws what the first would have drawn next
    assert len({repr(sorted(p.items())) for p in a.asked}) == 8


def test_tpe_without_optuna_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"fedmaml\[tune\]"):
        make_search("tpe", parse_space(["eta=log:1e-3:1e-1"]), "min", 0, 5)


def test_tpe_asks_batches_inside_the_space_and_learns():
    pytest.importorskip("optuna")
    space = parse_space(["eta=log:1e-3:1e-1", "beta=0.3,0.5,0.7"])
    tpe = make_search("tpe", space, "min", 0, 5)
    for _ in range(4):
        batch = tpe.ask(6)
        assert len(batch) == 6
        for p in batch:  # the score: distance from eta = 0.01, beta = 0.5
            assert 1e-3 <= p["algorithm.eta"] <= 1e-1 and p["algorithm.beta"] in (0.3, 0.5, 0.7)
            tpe.tell(p, abs(math.log10(p["algorithm.eta"]) + 2) + abs(p["algorithm.beta"] - 0.5),
                     "complete")
    assert len({repr(sorted(p.items())) for p in tpe.asked}) == 24


# -- real tuning runs ------------------------------------------------------------------------------

def _base(tiny_config, tmp_path):
    return tiny_config("federated.rounds=8", "federated.eval_every=2", "algorithm.name=moml",
                       "federated.checkpoint_every=0")


def _spec(**kw):
    base = dict(space=parse_space(["eta=0.5,0.05,0.005"]), seeds=(100, 101),
                metric=parse_metric("unseen.loss.mean"), rungs=2, reduction=3.0)
    return TuneSpec(**{**base, **kw})


def _finals(report: Path) -> dict:
    data = json.loads(report.with_name("report.json").read_text())
    return {json.dumps(c["params"], sort_keys=True): [(r["status"], r["rounds"], r["curve"])
                                                      for r in c["runs"]]
            for s in data["settings"] for c in s["candidates"]}


def test_tune_with_rungs_stops_the_rest_at_the_rung_and_the_tuned_yaml_runs(tiny_config, tmp_path):
    # compare_with baselines would keep runs out of a batch: trials leave them out, the tuned
    # config keeps them
    base = tiny_config("federated.rounds=8", "federated.eval_every=2", "algorithm.name=moml",
                       "compare_with=fedavg")
    result = Tuner(base, _spec(tuned_set={"data.unseen_clients": 1}), tmp_path / "t",
                   quiet=True).run()
    (s,) = result.settings
    assert s.rungs == [4, 8]
    reached = {c.id: max(r.rounds for r in c.runs) for c in s.choice.ranked}
    # ceil(3 / 3) = 1 goes on; eta = 0.5 diverges before the rung (round 4 of this problem)
    assert sorted(reached.values()) == [3, 4, 8]
    for c in s.choice.ranked:
        for r in c.runs:
            run = tmp_path / "t" / "trials" / _dir(c.params, r.seed)
            status = json.loads((run / "summary.json").read_text())["status"]
            expected = {3: "diverged", 4: "interrupted", 8: "completed"}[reached[c.id]]
            assert status == r.status == expected
            # stopped at the rung with a checkpoint: `fedmaml run --resume` continues it
            assert (run / "checkpoint.pt").exists() == (expected == "interrupted")
    assert "diverged on seed 100" in s.choice.ranked[-1].excluded
    # the one that went on had the best mean at the rung
    at_rung = {c.id: c.extra["rungs"][4] for c in s.choice.ranked}
    best = min(at_rung, key=at_rung.get)
    assert reached[best] == 8
    assert s.choice.chosen is not None and s.choice.chosen.id == best
    tuned = s.tuned_path
    cfg = load_config(tuned)
    assert cfg.algorithm.eta == s.choice.chosen.params["algorithm.eta"]
    assert cfg.data.unseen_clients == 1 and cfg.seed == base.seed
    assert cfg.compare_with == ("fedavg",)
    out = tmp_path / "runs_of_tuned"
    assert main(["run", str(tuned), f"output_dir={out}", "--quiet"]) == 0
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert main(["sweep", str(tuned), "--seeds", "0,1", "--dry-run",
                 "--sweep-dir", str(tmp_path / "sw")]) == 0
    assert (tmp_path / "t" / "report.md").read_text().count("| ") > 3
    assert (tmp_path / "t" / "search.png").stat().st_size > 0


def _dir(params, seed):
    from fedmaml.sweep import run_name

    return run_name(params, seed)


def test_tune_resumes_after_a_stop_mid_batch_to_the_same_numbers(tiny_config, tmp_path,
                                                                 monkeypatch):
    """A stop in the middle of the last rung (as Ctrl-C or SIGTERM asks it) ends the invocation;
    the same call again continues every run from its checkpoint, and every curve equals the one of
    a tuning run that was never stopped."""
    from fedmaml.engines import run_batch
    from fedmaml.federated import checkpoint

    base = _base(tiny_config, tmp_path)
    whole = Tuner(base, _spec(), tmp_path / "whole", quiet=True).run()
    train_round = run_batch.RunBatch._train_round

    def stop_at_round_6(self, server_round):
        if server_round == 6:
            checkpoint.request_stop()
        return train_round(self, server_round)

    monkeypatch.setattr(run_batch.RunBatch, "_train_round", stop_at_round_6)
    with pytest.raises(KeyboardInterrupt):
        Tuner(base, _spec(), tmp_path / "stopped", quiet=True).run()
    ledger = json.loads((tmp_path / "stopped" / "ledger.json").read_text())
    assert len(ledger["candidates"]) == 3
    monkeypatch.setattr(run_batch.RunBatch, "_train_round", train_round)
    again = Tuner(base, _spec(), tmp_path / "stopped", quiet=True).run()
    assert _finals(again.report) == _finals(whole.report)
    assert again.settings[0].choice.chosen.params == whole.settings[0].choice.chosen.params
    # a different spec in the same directory is refused, naming the difference
    from fedmaml.errors import FedmamlError

    with pytest.raises(FedmamlError, match="holds another tuning run.*rise"):
        Tuner(base, _spec(rise=1.5), tmp_path / "stopped", quiet=True).run()


def test_cli_tune_refuses_one_seed_and_reports(tmp_path, tiny_config, capsys):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(dump_yaml(_base(tiny_config, tmp_path)))
    assert main(["tune", str(cfg_path), "--space", "eta=0.05,0.005", "--seeds", "3"]) == 2
    assert "at least 2 seeds" in capsys.readouterr().err
    assert main(["tune", str(cfg_path), "--space", "eta=0.05,0.005", "--search", "random"]) == 2
    assert "--trials N" in capsys.readouterr().err
    # with a tracker on, every trial is tracked, with the searched key as a hyperparameter
    code = main(["tune", str(cfg_path), "tracking.backends=tensorboard", "--space",
                 "eta=0.05,0.005", "--tune-dir", str(tmp_path / "cli"), "--quiet", "--rise", "100"])
    out = capsys.readouterr().out
    assert code == 0 and "tuned config:" in out and "report:" in out
    from fedmaml.tracking import run_info

    trials = sorted(p for p in (tmp_path / "cli" / "trials").iterdir() if p.is_dir())
    assert len(trials) == 4
    for run in trials:
        assert list(run.glob("events.out.tfevents.*")), run
        info = run_info(load_config(run / "config.yaml"), run)
        assert set(info.hparams) == {"algorithm.eta", "seed"}
