"""Lambda-pattern selection (docs/lambda_patterns.md): the candidate family, the selection rule
(ties, nothing within epsilon, invalid candidates, units), measurement and merging, the federated
round trip through the real ClientApp (in-process and Ray), and ``fedmaml select-pattern``."""

import json
import math

import pytest
import torch

from fedmaml.cli import main
from fedmaml.config import load_config, replace_paths
from fedmaml.core import pattern_selection as ps
from fedmaml.core.adaptation import query_loss
from fedmaml.core.evaluation import personalized_metrics
from fedmaml.core.patterns import Pattern
from fedmaml.errors import ConfigError, MessageError
from fedmaml.engines.inprocess import run_inprocess
from fedmaml.experiment import run_experiment
from fedmaml.federated import pattern_selection as fps
from fedmaml.federated import records as R
from fedmaml.federated.client_app import make_client_app
from fedmaml.federated.server_app import make_server_app
from fedmaml.federated.setup import setup_for
from fedmaml.results.recorder import read_metrics, read_summary
from fedmaml.models import conv4

GROUPS = ("g1", "g2", "g3", "g4")


# -- candidates -------------------------------------------------------------------------------------

def test_family_is_full_then_top_k_then_deep_m_then_top_k():
    got = [(str(p), origin) for p, origin in ps.family_patterns(4, 3, full_steps=(1, 2))]
    assert got == [
        ("1111x3", "full"),
        ("0001x3", "top-k"), ("0011x3", "top-k"), ("0111x3", "top-k"),
        ("1111|0001x2", "full-m+top-k"), ("1111|0011x2", "full-m+top-k"),
        ("1111|0111x2", "full-m+top-k"),
        ("0111|0001x2", "top-K-m+top-k"), ("0111|0011x2", "top-K-m+top-k"),
        ("0011|0001x2", "top-K-m+top-k"),
        ("1111x2|0001", "full-m+top-k"), ("1111x2|0011", "full-m+top-k"),
        ("1111x2|0111", "full-m+top-k"),
        ("0111x2|0001", "top-K-m+top-k"), ("0111x2|0011", "top-K-m+top-k"),
        ("0011x2|0001", "top-K-m+top-k"),
    ]
    # every candidate is distinct, and each later step adapts no more groups than the first
    pats = [p for p, _ in ps.family_patterns(5, 5, full_steps=(1, 2))]
    assert len({str(p) for p in pats}) == len(pats) == 1 + 4 + 2 * (4 + 3 + 2 + 1)
    assert all(len(p.adapted(s)) <= len(p.adapted(0)) for p in pats for s in range(p.steps))


def test_family_limits():
    # max_top_k bounds k, the groups of the later steps
    assert [str(p) for p, _ in ps.family_patterns(4, 3, max_top_k=1, full_steps=(1,))] == [
        "1111x3", "0001x3", "1111|0001x2", "0111|0001x2", "0011|0001x2"]
    # m outside 0 < m < steps adds nothing; a one-step family is full + top-k
    assert [str(p) for p, _ in ps.family_patterns(3, 1, full_steps=(1, 5))] == ["111", "001", "011"]
    with pytest.raises(ValueError):
        ps.family_patterns(4, 0)


def test_user_candidates_aliases_duplicates_and_invalid_ones():
    cands = ps.build_candidates(GROUPS, 2, model_name="m", family=False,
                                user="head, 1111x2 0001|0011,,110 bogus none")
    texts = [c.text for c in cands]
    assert texts == ["1111x2", "0001x2", "0001|0011", "110", "bogus", "none"]
    assert [c.origin for c in cands] == ["full", "user", "user", "user", "user", "user"]
    bad = {c.text: c.error for c in cands if not c.valid}
    assert set(bad) == {"110", "bogus"}
    # the reported error is the pattern error, naming the model's groups
    assert "3 bits per row" in bad["110"] and str(list(GROUPS)) in bad["110"]
    assert "bad pattern segment" in bad["bogus"]
    assert ps.split_candidates(["0001x2,1111", " 0011 "]) == ["0001x2", "1111", "0011"]


# -- the selection rule -----------------------------------------------------------------------------

def measured(rows, metric="accuracy", examples=10):
    """rows: (pattern, quality, ms)."""
    return ps.Measurement(tuple(r[0] for r in rows), metric, tuple(r[1] for r in rows),
                          tuple(r[1] for r in rows), tuple(r[2] for r in rows), examples)


def test_fastest_within_epsilon_is_chosen():
    m = measured([("1111x2", 0.80, 10.0), ("0001x2", 0.70, 1.0), ("0011x2", 0.795, 3.0),
                  ("0111x2", 0.81, 6.0)])
    sel = ps.select_pattern(m, "1111x2", 1.0, "accuracy_points")
    assert sel.chosen == "0011x2"
    assert "faster than full" in sel.reason
    row = sel.row("0011x2")
    assert row["qualifies"] and row["speedup"] == pytest.approx(10 / 3)
    assert row["change"] == pytest.approx(-0.5)
    assert not sel.row("0001x2")["qualifies"]
    # a larger epsilon admits head-only
    assert ps.select_pattern(m, "1111x2", 10.0, "accuracy_points").chosen == "0001x2"


def test_exactly_epsilon_worse_qualifies():
    m = measured([("1111", 0.7, 10.0), ("0001", 0.69, 1.0)])  # 0.7 - 0.69 is not exactly 0.01
    assert ps.select_pattern(m, "1111", 1.0, "accuracy_points").chosen == "0001"
    assert ps.select_pattern(m, "1111", 0.99, "accuracy_points").chosen == "1111"


def test_nothing_within_epsilon_chooses_full_and_says_so():
    m = measured([("1111x2", 0.9, 10.0), ("0001x2", 0.5, 1.0), ("0011x2", 0.85, 2.0)])
    sel = ps.select_pattern(m, "1111x2", 1.0, "accuracy_points")
    assert sel.chosen == "1111x2" and sel.chose_full
    assert "no candidate other than the full pattern" in sel.reason


def test_qualifying_but_slower_than_full_chooses_full():
    m = measured([("1111", 0.9, 1.0), ("0111", 0.9, 2.0)])
    sel = ps.select_pattern(m, "1111", 1.0, "accuracy_points")
    assert sel.chosen == "1111" and "none is faster" in sel.reason


def test_ties_fewer_group_steps_then_text_order():
    # equal times: fewer adapted (group, step) pairs wins (0011x2: 4 < 1111|0001: 5)
    m = measured([("1111x2", 0.9, 10.0), ("1111|0001", 0.9, 2.0), ("0011x2", 0.9, 2.0)])
    assert ps.select_pattern(m, "1111x2", 1.0, "accuracy_points").chosen == "0011x2"
    # equal times and equal group-steps: the smaller canonical text, whatever the list order
    for order in ([1, 2], [2, 1]):
        rows = [("1111x2", 0.9, 10.0), ("0101x2", 0.9, 2.0), ("0011x2", 0.9, 2.0)]
        m = measured([rows[0]] + [rows[i] for i in order])
        assert ps.select_pattern(m, "1111x2", 1.0, "accuracy_points").chosen == "0011x2"


def test_time_tolerance_makes_near_equal_times_ties():
    m = measured([("1111x2", 0.9, 10.0), ("0011x2", 0.9, 2.04), ("0001x2", 0.9, 2.0),
                  ("0111|0001", 0.9, 1.99)])
    # strict: the fastest; with 5 % tolerance all three are tied and 0001x2 (2 group-steps) wins
    assert ps.select_pattern(m, "1111x2", 1.0, "accuracy_points").chosen == "0111|0001"
    assert ps.select_pattern(m, "1111x2", 1.0, "accuracy_points",
                             time_tolerance=0.05).chosen == "0001x2"


def test_loss_percent_unit_for_regression():
    m = measured([("111x3", 2.0, 10.0), ("001x3", 2.2, 1.0), ("011x3", 2.1, 3.0)], metric="loss")
    assert ps.select_pattern(m, "111x3", 5.0, "loss_percent").chosen == "011x3"
    assert ps.select_pattern(m, "111x3", 10.0, "loss_percent").chosen == "001x3"
    assert ps.select_pattern(m, "111x3", 4.0, "loss_percent").chosen == "111x3"
    assert ps.select_pattern(m, "111x3", 10.0, "loss_percent").row("011x3")["change"] == \
        pytest.approx(5.0)
    assert ps.resolve_unit("auto", True) == "accuracy_points"
    assert ps.resolve_unit("auto", False) == "loss_percent"


def test_invalid_and_non_finite_candidates_are_never_chosen():
    cands = ps.build_candidates(GROUPS, 1, family=False, user="0001,01")
    invalid = [c for c in cands if not c.valid]
    m = measured([("1111", 0.9, 10.0), ("0001", math.nan, 0.5)])
    sel = ps.select_pattern(m, "1111", 5.0, "accuracy_points", invalid=invalid)
    assert sel.chosen == "1111"
    assert sel.row("01")["error"].startswith("pattern '01' has 2 bits per row")
    assert not sel.row("0001")["qualifies"]


def test_only_full_measured_says_why_not_epsilon():
    # every candidate beside full was refused: the reason names each and its error, and no
    # epsilon was applied (nothing was within or outside it)
    cands = ps.build_candidates(GROUPS, 1, family=False, user="01,bogus")
    invalid = [c for c in cands if not c.valid]
    sel = ps.select_pattern(measured([("1111", 0.9, 10.0)]), "1111", 5.0, "accuracy_points",
                            invalid=invalid)
    assert sel.chosen == "1111" and "epsilon" not in sel.reason
    assert sel.reason.startswith("no candidate other than the full pattern was valid")
    assert "'01': pattern '01' has 2 bits per row" in sel.reason
    assert "'bogus': bad pattern segment 'bogus'" in sel.reason
    alone = ps.select_pattern(measured([("1111", 0.9, 10.0)]), "1111", 5.0, "accuracy_points")
    assert alone.reason == "the full pattern is the only candidate"


def test_rule_rejects_bad_arguments():
    m = measured([("1111", 0.9, 1.0)])
    with pytest.raises(ValueError, match="unit"):
        ps.select_pattern(m, "1111", 1.0, "points")
    with pytest.raises(ValueError, match="epsilon"):
        ps.select_pattern(m, "1111", -1.0, "accuracy_points")
    with pytest.raises(ValueError, match="not measured"):
        ps.select_pattern(m, "1111x2", 1.0, "accuracy_points")


def test_combine_weights_quality_by_examples_and_takes_median_time():
    a = ps.Measurement(("p", "q"), "accuracy", (1.0, 0.0), (0.1, 0.2), (1.0, 10.0), 30)
    b = ps.Measurement(("p", "q"), "accuracy", (0.0, 1.0), (0.3, 0.4), (2.0, 20.0), 10)
    c = ps.Measurement(("p", "q"), "accuracy", (0.5, 0.5), (0.5, 0.5), (9.0, 30.0), 60)
    m = ps.combine_measurements([a, b, c])
    assert m.quality == pytest.approx((0.6, 0.4))
    assert m.loss == pytest.approx((0.36, 0.40))
    assert m.ms == (2.0, 20.0) and m.examples == 100 and m.sources == 3
    with pytest.raises(ValueError, match="different candidate lists"):
        ps.combine_measurements([a, ps.Measurement(("q", "p"), "accuracy", (1, 1), (1, 1), (1, 1), 1)])


def test_validation_and_test_clients_are_disjoint():
    val, test = ps.validation_and_test_clients(20, 4, 5, 0, seed=3)
    assert len(val) == 5 and all(0 <= c < 20 for c in val) and test == [20, 21, 22, 23]
    assert ps.validation_and_test_clients(20, 4, 5, 0, seed=3) == (val, test)  # seeded
    val, test = ps.validation_and_test_clients(10, 0, 4, 3, seed=0)
    assert len(val) == 4 and len(test) == 3 and not set(val) & set(test)
    assert ps.validation_and_test_clients(3, 0, 0, 0, seed=0) == ([0, 1, 2], [])


# -- measuring on a real model ----------------------------------------------------------------------

def test_measure_candidates_matches_personalized_metrics_and_times():
    model = conv4((1, 12, 12), 3, width=4)  # groups conv1..conv4, head
    w = model.init(0)
    g = torch.Generator().manual_seed(1)
    splits = [(torch.randn(6, 1, 12, 12, generator=g), torch.arange(6) % 3,
               torch.randn(n, 1, 12, 12, generator=g), torch.arange(n) % 3) for n in (4, 8)]
    pats = [Pattern.parse(t) for t in ("11111x2", "00001x2", "none")]
    loss_fn = torch.nn.functional.cross_entropy
    m = ps.measure_candidates(model, w, loss_fn, splits, pats, 0.1, True, warmup=1, repeats=2)
    assert m.patterns == ("11111x2", "00001x2", "none") and m.examples == 12
    for i, p in enumerate(pats):
        per = [personalized_metrics(model, loss_fn, w, *s, p, 0.1, True) for s in splits]
        assert m.quality[i] == pytest.approx((4 * float(per[0]["accuracy"])
                                              + 8 * float(per[1]["accuracy"])) / 12)
        assert m.loss[i] == pytest.approx((4 * float(per[0]["loss"]) + 8 * float(per[1]["loss"])) / 12)
    assert all(t > 0 for t in m.ms)
    untimed = ps.measure_candidates(model, w, loss_fn, splits, pats, 0.1, True, timed_splits=0)
    assert all(math.isnan(t) for t in untimed.ms) and untimed.quality == m.quality
    # second-order timing runs the backward pass through the adaptation
    assert ps.time_adaptation(model, w, *splits[0][:2], loss_fn, pats[1], 0.1, second_order=True,
                              warmup=0, repeats=1) > 0


# -- config -----------------------------------------------------------------------------------------

def test_config_keys_are_checked():
    with pytest.raises(ConfigError, match=r"pattern_selection.at_round: 9 exceeds federated.rounds"):
        load_config(None, ["federated.rounds=5", "pattern_selection.at_round=9"])
    with pytest.raises(ConfigError,
                       match=r"apply_to\[1\]: 'evalution' is not allowed.*did you mean 'evaluation'"):
        load_config(None, ["pattern_selection.apply_to=inner,evalution"])
    with pytest.raises(ConfigError, match="pattern_selection.mode"):
        load_config(None, ["pattern_selection.mode=sometimes"])


# -- federated round trip ---------------------------------------------------------------------------

def tiny_config(tmp_path, **extra):
    overrides = {
        "name": "sel", "output_dir": str(tmp_path),
        "data.family": "sinusoid", "data.num_clients": 8, "data.unseen_clients": 2,
        "model.hidden": [8, 8], "algorithm.inner_steps": 1, "algorithm.support_size": 5,
        "federated.rounds": 3, "federated.clients_per_round": 3, "federated.eval_every": 1,
        "federated.eval_clients": 3, "evaluation.steps": 2,
        "pattern_selection.mode": "federated", "pattern_selection.at_round": 2,
        "pattern_selection.validation_clients": 3, "pattern_selection.warmup": 1,
        "pattern_selection.repeats": 2,
        # "none" (no adaptation) is the fastest candidate by far, so a huge epsilon must choose it
        "pattern_selection.epsilon": 1e9, "pattern_selection.candidates": "none",
        "pattern_selection.max_top_k": 1,
    }
    overrides.update(extra)
    return replace_paths(load_config(None), overrides)


def unseen_loss_without_adaptation(setup, w):
    fed = setup.federation
    total = n = 0.0
    for j in range(fed.num_unseen):
        for task in fed.unseen_tasks(j):
            _, _, hx, hy = task.evaluation_split()
            total += float(query_loss(setup.model, w, hx, hy, setup.loss_fn)) * len(hy)
            n += len(hy)
    return total / n


def test_federated_selection_round_trip(tmp_path):
    cfg = tiny_config(tmp_path)
    setup = setup_for(cfg)
    client_app = make_client_app(cfg)
    sent = []

    def recording_client_app(message, context):  # the real ClientApp, keeping what it was sent
        sent.append(message)
        return client_app(message, context)

    run_dir = tmp_path / "run"
    run_inprocess(make_server_app(cfg, run_dir, quiet=True), recording_client_app,
                  setup.federation.num_clients + setup.federation.num_unseen)

    record = json.loads((run_dir / fps.RUN_FILE).read_text())
    assert record["mode"] == "federated" and record["round"] == 2
    assert record["chosen"] == "none" and record["epsilon_unit"] == "loss_percent"
    assert record["full"] == "111x2"
    assert {r["pattern"] for r in record["rows"]} == {"111x2", "001x2", "111|001", "011|001", "none"}
    assert all("test_loss" in r for r in record["rows"])  # test clients measured every candidate
    assert record["test_clients"] == [8, 9] and record["timing"]["failures"] == 0

    # who was asked what: validation clients timed the candidates, test clients did not
    select = [m for m in sent if m.metadata.message_type == fps.SELECT]
    to = sorted(m.metadata.dst_node_id - 2 for m in select)
    assert to == sorted(record["validation_clients"] + record["test_clients"])
    for m in select:
        conf = m.content[R.CONFIG]
        assert list(conf[fps.CANDIDATES]) == ["111x2", "001x2", "111|001", "011|001", "none"]
        assert int(conf[fps.REPEATS]) == (0 if m.metadata.dst_node_id - 2 >= 8 else 2)

    # the choice travels in later instructions only (selection runs after round 2's update)
    for m in sent:
        conf = dict(m.content[R.CONFIG]) if R.CONFIG in m.content else {}
        rnd = int(m.metadata.group_id) if m.metadata.group_id.isdigit() else None
        if m.metadata.message_type == "train":
            expect = rnd > 2
            assert (conf.get(fps.INNER) == "none") is expect
            assert (conf.get(fps.MEMORY) == "none") is expect
        if m.metadata.message_type == "evaluate":
            assert (conf.get(fps.EVAL) == "none") is (rnd >= 2)

    # ... and clients use it: the last evaluation adapted nothing, so its unseen loss is w's own
    rows = read_metrics(run_dir)
    assert "pattern_selection" in rows[2] and all("pattern_selection" not in rows[i] for i in (0, 1, 3))
    w = torch.load(run_dir / "model.pt", weights_only=True)
    assert rows[-1]["eval"]["unseen.loss.mean"] == pytest.approx(
        unseen_loss_without_adaptation(setup, w), rel=1e-5)
    summary = read_summary(run_dir)
    assert summary["pattern_selection"]["chosen"] == "none"


def test_client_applies_received_patterns_and_rejects_bad_ones(tmp_path):
    cfg = tiny_config(tmp_path, **{"pattern_selection.mode": "none"})
    setup = setup_for(cfg)
    hp = fps.hyper_for(setup.hyper, {fps.INNER: "001x3"}, setup)
    assert str(hp.step.inner_pattern) == "001x3"
    assert hp.step.memory_pattern == setup.hyper.step.memory_pattern
    assert fps.hyper_for(setup.hyper, {}, setup) is setup.hyper
    assert str(fps.eval_pattern_for({fps.EVAL: "011"}, setup)) == "011"
    assert fps.eval_pattern_for({}, setup) == setup.eval_pattern
    with pytest.raises(MessageError, match="eval-pattern.*3 layer groups"):
        fps.eval_pattern_for({fps.EVAL: "0001"}, setup)


def test_central_mode_in_a_run_records_the_choice(tmp_path):
    cfg = tiny_config(tmp_path, **{"pattern_selection.mode": "central",
                                   "pattern_selection.at_round": 0, "federated.rounds": 2,
                                   "pattern_selection.apply_to": "evaluation"})
    run_dir = run_experiment(cfg, quiet=True)
    record = json.loads((run_dir / fps.RUN_FILE).read_text())
    assert record["mode"] == "central" and record["round"] == 2 and record["chosen"] == "none"
    assert record["applied_to"] == [fps.EVAL]
    assert record["timing"]["where"] == "this process"


@pytest.mark.slow
@pytest.mark.ray
def test_federated_selection_under_ray(tmp_path):
    """Candidate lists and per-candidate metric lists survive Ray's serialization."""
    cfg = tiny_config(tmp_path, **{"engine.name": "ray", "federated.rounds": 2,
                                   "pattern_selection.at_round": 1})
    run_dir = run_experiment(cfg, quiet=True)
    record = json.loads((run_dir / fps.RUN_FILE).read_text())
    assert record["chosen"] == "none" and record["timing"]["failures"] == 0
    assert record["validation_replies"] == 3
    assert record["timing"]["client_torch_threads"] == [1, 1, 1]


# -- the CLI ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    cfg = tiny_config(tmp, **{"pattern_selection.mode": "none", "federated.rounds": 2})
    return run_experiment(cfg, quiet=True)


def test_cli_selects_on_a_run_directory(trained_run, capsys):
    code = main(["select-pattern", str(trained_run), "--epsilon", "1e9", "--candidates", "none",
                 "011x2", "0011", "pattern_selection.repeats=1", "pattern_selection.warmup=0"])
    out = capsys.readouterr().out
    assert code == 0
    assert "chosen: none" in out and "invalid: pattern '0011'" in out
    record = json.loads((trained_run / fps.CLI_FILE).read_text())
    assert record["chosen"] == "none" and record["timing"]["repeats"] == 1
    assert record["checkpoint"] == "model.pt"
    assert [r["pattern"] for r in record["rows"]][-1] == "0011"
    assert all("test_loss" in r for r in record["rows"] if "error" not in r)


def test_cli_shows_what_the_selection_does_unless_quiet(trained_run, tmp_path, capsys):
    args = ["select-pattern", str(trained_run), "--candidates", "none", "--only-candidates",
            "--out", str(tmp_path / "sel.json"), "pattern_selection.repeats=1",
            "pattern_selection.warmup=0"]
    assert main(args) == 0
    err = capsys.readouterr().err  # not a terminal: plain lines, the start of each phase
    assert "select-pattern 0/1 | pattern selection: 2 candidates on " in err, err
    assert "select-pattern 1/1 | chosen: " in err
    assert main([*args, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "written to" in captured.out


def test_cli_epsilon_zero_and_only_candidates(trained_run, tmp_path, capsys):
    out_file = tmp_path / "sel.json"
    code = main(["select-pattern", str(trained_run / "config.yaml"), "--checkpoint",
                 str(trained_run / "model.pt"), "--epsilon", "0", "--only-candidates",
                 "--candidates", "111x2", "--out", str(out_file)])
    assert code == 0, capsys.readouterr().err
    record = json.loads(out_file.read_text())
    assert [r["pattern"] for r in record["rows"]] == ["111x2"] and record["chosen"] == "111x2"


def test_cli_refuses_candidates_that_are_all_invalid_naming_each(trained_run, tmp_path, capsys):
    out = tmp_path / "sel.json"
    code = main(["select-pattern", str(trained_run), "--only-candidates", "--candidates", "0011",
                 "bogus", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()  # refused before measuring
    assert "error: --candidates: no candidate other than the full pattern was valid" in err
    assert "'0011': pattern '0011' has 4 bits per row" in err
    assert "'bogus': bad pattern segment 'bogus'" in err
    assert "with --only-candidates no other candidate is generated" in err
    assert "within epsilon" not in err


def test_cli_user_errors(trained_run, tmp_path, capsys):
    assert main(["select-pattern", str(trained_run / "config.yaml")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    torch.save({"layer1.weight": torch.zeros(2, 2)}, bad)
    assert main(["select-pattern", str(trained_run), "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.pt" in err and "do not match" in err
    assert main(["select-pattern", str(tmp_path)]) == 2
    assert "config.yaml" in capsys.readouterr().err
    # a flag's value is refused under the flag the user typed, then the key it sets
    for value, why in (("-1", "-1.0 is out of range; allowed: >= 0"),
                       ("nan", "expected a finite number, got nan")):
        assert main(["select-pattern", str(trained_run), "--epsilon", value]) == 2
        assert f"error: --epsilon (pattern_selection.epsilon): {why}\n" in capsys.readouterr().err


# -- the benchmark script ---------------------------------------------------------------------------

def test_lambda_speed_benchmark_writes_the_documented_json(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "simulations" / "benchmarks" / "lambda_speed.py"
    spec = importlib.util.spec_from_file_location("lambda_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "speed.json"
    threads = torch.get_num_threads()
    assert bench.main(["--out", str(out), "--settings", "miniimagenet_5w1s", "--width", "2",
                       "--threads", "1", "--orders", "first", "--cache", "on", "--full-steps", "1",
                       "--warmup", "0", "--repeats", "1", "--passes", "2", "--chosen", "00011x5",
                       "--md", str(tmp_path / "speed.md")]) == 0
    assert torch.get_num_threads() == threads  # the benchmark restores the thread count
    data = json.loads(out.read_text())
    s = data["miniimagenet_5w1s"]
    assert s["full_ms"] > 0 and s["patterns"]["11111x5"]["speedup"] == 1.0
    assert set(s["patterns"]) == {"11111x5", "00001x5", "00011x5", "00111x5", "01111x5",
                                  "11111|00001x4", "11111|00011x4", "11111|00111x4",
                                  "11111|01111x4", "01111|00001x4", "01111|00011x4",
                                  "01111|00111x4", "00111|00001x4", "00111|00011x4",
                                  "00011|00001x4"}
    assert all(p["ms"] > 0 and p["speedup"] > 0 for p in s["patterns"].values())
    assert list(s["variants"]) == ["threads=1,order=first,cache=on"]
    assert data["meta"]["torch_threads"] == threads and len(data["meta"]["loadavg"]) == 3
    assert set(data["targets"]) == {"miniimagenet_5w1s: head-only with caching >= 10x",
                                    "miniimagenet_5w1s: chosen 00011x5 >= 4x"}
    assert len(s["patterns"]["00001x5"]["pass_speedups"]) == 2 and len(s["load"]) == 2
    assert "| `11111\\|00001x4` |" in (tmp_path / "speed.md").read_text()
