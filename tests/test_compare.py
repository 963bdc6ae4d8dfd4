"""`fedmaml compare`: settings from real runs (seeds grouped, labels from what differs), curves and
numbers checked against the metrics files, the figures and the report, and refusal of runs that
cannot be compared."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedmaml.cli import COMPARE_BANDS, COMPARE_TABLE_FORMATS, COMPARE_X_AXES, main
from fedmaml.config import config_from_dict
from fedmaml.experiment import run_experiment
from fedmaml.results.compare import BANDS, X_AXES, CompareError, build_comparison, setting_curve
from fedmaml.results.compare_outputs import compare
from fedmaml.results.compare_report import markdown_table, table_legend
from fedmaml.results.compare_tables import TABLE_FORMATS, tex_escape
from fedmaml.sweep import load_sweep, run_sweep

TINY = {
    "name": "tiny", "seed": 0,
    "data": {"family": "sinusoid", "num_clients": 6, "unseen_clients": 2},
    "model": {"hidden": [16]},
    "federated": {"rounds": 4, "clients_per_round": 3, "eval_every": 2, "eval_clients": 0},
    "evaluation": {"steps": 3},
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def tiny(**changes) -> dict:
    d = json.loads(json.dumps(TINY))
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = d
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A real sweep (2 settings x 3 seeds) and single runs of other families and set-ups."""
    root = tmp_path_factory.mktemp("compare")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "output_dir": str(root)}))
    base, spec = load_sweep(cfg, grid_args=["beta=0.3,0.9"], seeds="0-2")
    run_sweep(base, spec, root / "sweep", quiet=True)
    others = {
        "grid": tiny(data__family="sinusoid_grid"),  # same metric (loss), another task family
        "synthetic": tiny(data__family="synthetic", data__num_clients=6),  # accuracy
        "no_unseen": tiny(data__unseen_clients=0),
        "baselines": tiny(compare_with="fedavg"),
    }
    for name, d in others.items():
        run_experiment(config_from_dict({**d, "name": name}), quiet=True, run_dir=root / name)
    return root


def metric_values(run_dir: Path, key: str = "seen.loss.mean") -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["round"]: r["eval"][key] for r in rows if key in r.get("eval", {})}


def test_cli_choices_match_the_module():
    assert COMPARE_X_AXES == X_AXES and COMPARE_BANDS == BANDS
    assert COMPARE_TABLE_FORMATS == TABLE_FORMATS


def test_seeds_form_settings_labelled_by_what_differs(runs):
    c = build_comparison([runs / "sweep"])
    assert [s.label for s in c.settings] == ["beta=0.3", "beta=0.9"]
    assert [sorted(r.seed for r in s.runs) for s in c.settings] == [[0, 1, 2], [0, 1, 2]]
    assert c.metric.key == "seen.loss.mean" and not c.metric.higher_is_better


def test_curve_and_numbers_are_those_of_the_metrics_files(runs):
    c = build_comparison([runs / "sweep"], target=math.inf)  # every evaluation reaches it
    setting, stats = c.settings[1], c.stats[1]
    per_seed = [metric_values(r.dir) for r in setting.runs]
    rounds = sorted(per_seed[0])
    assert rounds == [0, 2, 4]
    ys = np.array([[v[rd] for rd in rounds] for v in per_seed])
    curve = setting_curve(setting, c.metric, "rounds", band="std")
    np.testing.assert_allclose(curve.x, rounds)
    np.testing.assert_allclose(curve.mean, ys.mean(axis=0))
    np.testing.assert_allclose(curve.high - curve.mean, ys.std(axis=0, ddof=1))
    minmax = setting_curve(setting, c.metric, "rounds", band="minmax")
    np.testing.assert_allclose(minmax.low, ys.min(axis=0))
    assert stats.final.mean == pytest.approx(ys[:, -1].mean())
    assert stats.final.std == pytest.approx(ys[:, -1].std(ddof=1))
    assert stats.best.mean == pytest.approx(ys.min(axis=1).mean())
    assert stats.rounds_to_target == 0  # round 0 already reaches inf
    # x = bytes: the cumulative bytes of each round, averaged over seeds.
    by_bytes = setting_curve(setting, c.metric, "bytes")
    assert by_bytes.x[0] == 0 and np.all(np.diff(by_bytes.x) > 0)
    assert stats.bytes.mean == pytest.approx(by_bytes.x[-1])


def test_rounds_to_a_target(runs):
    c = build_comparison([runs / "sweep"])  # default: the least good final mean
    worst = max(s.final.mean for s in c.stats)
    assert c.target == pytest.approx(worst) and c.target_is_default
    for setting, stats in zip(c.settings, c.stats):
        per_seed = [metric_values(r.dir) for r in setting.runs]
        mean = {rd: np.mean([v[rd] for v in per_seed]) for rd in sorted(per_seed[0])}
        first = next(rd for rd, v in mean.items() if v <= c.target)  # the worst one ends there
        assert stats.rounds_to_target == first
        samples = [next(json.loads(x)["samples"] for x in (r.dir / "metrics.jsonl").read_text()
                        .splitlines() if json.loads(x)["round"] == first) for r in setting.runs]
        assert stats.samples_to_target == pytest.approx(np.mean(samples))
    c = build_comparison([runs / "sweep"], target=-1.0)
    assert all(math.isnan(s.rounds_to_target) for s in c.stats)
    assert "| not reached | not reached |" in markdown_table(c)


def test_compare_writes_figures_and_report(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(runs / "sweep"), "--x", "rounds", "--x", "samples", "--log", "y",
                 "--dist", "violin", "--out", str(out), "--format", "png", "--format", "pdf"]) == 0
    printed = capsys.readouterr().out
    assert "| beta=0.3 | 3 |" in printed and "| beta=0.9 | 3 |" in printed
    for name in ("convergence-seen.loss.mean-rounds", "convergence-seen.loss.mean-samples",
                 "clients-seen.loss"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
        assert (out / f"{name}.pdf").read_bytes()[:4] == b"%PDF"
    report = (out / "report.md").read_text()
    assert "![convergence-seen.loss.mean-rounds](convergence-seen.loss.mean-rounds.png)" in report
    assert ("| Setting | Runs | Before training | Final | Best | Rounds to target | Samples to "
            "target |") in report
    assert "differ in `algorithm.beta`" in report
    # Links to the runs are relative, so the report survives moving the directory.
    assert "](../" in report and str(tmp_path) not in report.split("## Runs")[1]


def test_default_output_next_to_a_single_directory(runs, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(runs / "sweep", sweep)
    result = compare([sweep])
    assert result.out_dir == sweep / "compare" and (sweep / "compare" / "report.md").exists()
    # The compare directory holds no run: comparing again finds the same runs.
    assert len(build_comparison([sweep]).settings) == 2
    with pytest.raises(CompareError, match="--out DIR is needed"):
        compare([sweep, runs / "no_unseen"])


def test_the_report_counts_one_run_in_the_singular(runs, tmp_path):
    report = compare([runs / "no_unseen"], out_dir=tmp_path).report.read_text()
    assert "1 run in 1 setting, from " in report


def test_baselines_inside_a_run_are_compared_by_algorithm(runs):
    c = build_comparison([runs / "baselines"])
    assert [s.label for s in c.settings] == ["fedavg", "moml"]


def test_metric_names(runs):
    assert build_comparison([runs / "sweep"], "loss").metric.key == "seen.loss.mean"
    assert build_comparison([runs / "sweep"], "seen.memory-loss").metric.key == "seen.memory-loss.mean"
    assert build_comparison([runs / "sweep"], "unseen.loss.p50").metric.key == "unseen.loss.p50"
    assert build_comparison([runs / "sweep"], "loss_after").metric.key == "loss_after"
    assert build_comparison([runs / "synthetic"]).metric.key == "seen.accuracy.mean"
    with pytest.raises(CompareError, match=r"--metric 'bogus': no run recorded 'seen\.bogus\.mean'; "
                                           r"available: .*seen\.loss\.mean"):
        build_comparison([runs / "sweep"], "bogus")


@pytest.mark.parametrize("other, metric, message", [
    ("synthetic", None, r"measure different metrics .*'loss': .*'accuracy': .*synthetic"),
    ("grid", None, r"different task families \(data\.family\).*'sinusoid_grid': .*grid"),
    ("no_unseen", "unseen.loss", r"--metric 'unseen\.loss\.mean': missing in 1 of 7 runs "
                                 r"\(.*no_unseen\).*data\.unseen_clients"),
])
def test_incomparable_runs_are_refused(runs, tmp_path, capsys, other, metric, message):
    with pytest.raises(CompareError, match=message):
        build_comparison([runs / "sweep", runs / other], metric)
    argv = ["compare", str(runs / "sweep"), str(runs / other), "--out", str(tmp_path / "x")]
    assert main(argv + (["--metric", metric] if metric else [])) == 2
    assert "error: " in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # no figure of incomparable runs


def test_unfinished_runs_are_left_out_with_a_note(runs, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(runs / "sweep", sweep)
    (sweep / "beta=0.9,seed=2" / "summary.json").unlink()
    c = build_comparison([sweep])
    assert [len(s.runs) for s in c.settings] == [3, 2]
    assert any("left out 1 unfinished" in n and "beta=0.9,seed=2" in n for n in c.notes)
    for d in sweep.glob("*/summary.json"):
        d.unlink()
    with pytest.raises(CompareError, match="no finished run"):
        build_comparison([sweep])


def test_compare_does_not_import_torch(runs, tmp_path):
    """Reading JSON and plotting must stay fast: no torch (seconds to import) in compare's path."""
    code = ("import sys; from fedmaml.results.compare_outputs import compare; "
            f"compare([{str(runs / 'sweep')!r}], out_dir={str(tmp_path)!r}); "
            "assert 'torch' not in sys.modules, 'compare imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (tmp_path / "report.md").exists()


def test_missing_or_empty_paths(tmp_path):
    with pytest.raises(CompareError, match="no such run or sweep directory"):
        build_comparison([tmp_path / "nope"])
    with pytest.raises(CompareError, match="holds no run directory"):
        build_comparison([tmp_path])


@pytest.fixture(scope="module")
def named_sweep(tmp_path_factory):
    """A vectorized sweep with named settings (2 settings x 2 grid values x 2 seeds) whose settings
    differ only in keys a batch carries per run (eta, beta), plus one of another algorithm."""
    root = tmp_path_factory.mktemp("named")
    cfg = root / "named.yaml"
    cfg.write_text(yaml.safe_dump({**tiny(algorithm__name="moml"), "output_dir": str(root)})
                   + "sweep:\n  settings:\n    slow: {algorithm.eta: 0.001}\n"
                   "    fast: {algorithm.eta: 0.02, algorithm.beta: 0.5}\n"
                   "    FO-MAML: {algorithm.name: fedmeta, algorithm.scale_by_beta: false}\n"
                   "  references:\n"
                   "    slow: {text: 0.456 at 4 rounds (elsewhere), metric: loss, rounds: 4}\n"
                   "    fast: {text: 0.123 at 100 rounds (elsewhere), metric: seen.loss.mean,\n"
                   "           rounds: [100, 200]}\n"
                   "    FO-MAML: {text: 0.789 on unseen clients, metric: unseen.loss}\n"
                   "  grid:\n    algorithm.alpha: [0.01, 0.02]\n  seeds: [0, 1]\n")
    base, spec = load_sweep(cfg)
    run_sweep(base, spec, root / "sweep", quiet=True, vectorize=True)
    return root / "sweep"


def test_settings_that_differ_in_one_entry_of_algorithm_kwargs_are_labelled_by_it(tmp_path):
    """A sweep over algorithm.kwargs.lam labels its settings lam=..., as it names their run
    directories, rather than by the whole kwargs text; a setting without lam says nothing of it."""
    from fedmaml.config import load_config
    from fedmaml.results.compare import NamedSetting, Run, group_settings

    def run(*overrides, named=None):
        cfg = load_config(None, ["algorithm.name=my_algos:Mine", "algorithm.kwargs={mu: 2}",
                                 *overrides])
        return Run(tmp_path, cfg, {}, [], named)

    labels = [s.label for s in group_settings([run("algorithm.kwargs.lam=0.5"),
                                               run("algorithm.kwargs.lam=0.1"),
                                               run("algorithm.kwargs.lam=0.1", "seed=1")])]
    assert labels == ["algorithm.kwargs.lam=0.1", "algorithm.kwargs.lam=0.5"]
    # named settings say the entries they set, or that the mapping they set holds, by their names
    weak = NamedSetting("weak", 0, {"algorithm.kwargs.lam": 0.1})
    fedavg = NamedSetting("FedAvg", 1, {"algorithm.name": "fedavg", "algorithm.kwargs": ""})
    labels = [s.label for s in group_settings([
        run("algorithm.kwargs.lam=0.1", "algorithm.eta=0.1", named=weak),
        run("algorithm.kwargs.lam=0.1", "algorithm.eta=0.2", named=weak),
        run("algorithm.name=fedavg", "algorithm.kwargs=", named=fedavg)])]
    assert labels == ["weak, eta=0.1", "weak, eta=0.2", "FedAvg, eta=0.005"]


def test_named_settings_label_the_table_in_the_sweeps_order(named_sweep, capsys):
    # slow and fast (moml, differing in eta and beta only) share every shape: one batch of 8 runs;
    # FO-MAML (another algorithm) a batch of its own.
    batches = {d.name: json.loads((d / "summary.json").read_text())["batch"]["runs"]
               for d in named_sweep.iterdir() if d.is_dir()}
    assert len(batches) == 12
    assert {n: b for n, b in batches.items() if not n.startswith("FO-MAML")} == {
        n: 8 for n in batches if not n.startswith("FO-MAML")}
    assert {b for n, b in batches.items() if n.startswith("FO-MAML")} == {4}
    c = build_comparison([named_sweep])
    # Named settings keep the sweep's order; the grid's values follow the name.
    assert [s.label for s in c.settings] == [f"{n}, algorithm.alpha={a}" for n in
                                             ("slow", "fast", "FO-MAML") for a in (0.01, 0.02)]
    assert all(len(s.runs) == 2 for s in c.settings)
    table = markdown_table(c)
    assert table.splitlines()[0].endswith("| Reference |")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert rows["fast, algorithm.alpha=0.01"].endswith("| 0.123 at 100 rounds (elsewhere) |")
    assert rows["slow, algorithm.alpha=0.01"].endswith("| 0.456 at 4 rounds (elsewhere) |")
    assert rows["FO-MAML, algorithm.alpha=0.01"].endswith("| - |")  # its reference is of unseen
    assert main(["compare", str(named_sweep), "--out", str(named_sweep.parent / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "| FO-MAML, algorithm.alpha=0.02 | 2 |" in printed
    report = (named_sweep.parent / "cmp" / "report.md").read_text()
    assert "- **fast** (a named setting of the sweep) sets `algorithm.eta=0.02`, " \
           "`algorithm.beta=0.5`." in report
    assert "- FO-MAML, algorithm.alpha=0.01: [FO-MAML,algorithm.alpha=0.01,seed=0]" in report


def test_before_training_is_empty_for_a_metric_without_a_round_0_value(runs):
    # MOML's memories are made in training: the memory metrics start at the first evaluation after
    # it (round 2 here), which is no value before training.
    c = build_comparison([runs / "sweep"], metric="seen.memory-loss")
    for setting, stats in zip(c.settings, c.stats):
        recorded = [metric_values(r.dir, "seen.memory-loss.mean") for r in setting.runs]
        assert all(0 not in v and len(v) >= 1 for v in recorded)
        assert all(math.isnan(v) for v in stats.before.values)
        assert stats.final.values == pytest.approx([v[max(v)] for v in recorded])
    for line in markdown_table(c).splitlines()[2:]:
        assert line.split(" | ")[2] == "-", line  # Setting | Runs | Before training | ...
    assert "- where the metric has no value at round 0" in table_legend(c)


def test_the_table_shows_the_value_before_training_and_a_legend(runs, capsys):
    c = build_comparison([runs / "sweep"], metric="unseen.loss")
    for setting, stats in zip(c.settings, c.stats):
        at_zero = [metric_values(r.dir, "unseen.loss.mean")[0] for r in setting.runs]
        assert stats.before.values == pytest.approx(at_zero)
        assert stats.before.std == pytest.approx(np.std(at_zero, ddof=1))
    assert "| Before training | Final | Best |" in markdown_table(c)
    assert main(["compare", str(runs / "sweep"), "--metric", "unseen.loss",
                 "--out", str(runs / "cmp-legend")]) == 0
    printed = capsys.readouterr().out
    legend = printed.split("Columns (")[1]
    for column in ("Setting:", "Runs:", "Before training:", "Final:", "Best:", "Rounds / Samples "
                   "to target:", "Wall time:", "Communicated:"):
        assert column in legend, column
    assert "personalized loss, unseen clients" in printed.split("Columns (")[1].splitlines()[0]
    assert "Lambda pattern full (evaluation.pattern) in every column" in legend
    assert "Reference" not in printed.split("\n")[0]  # no reference column without references


def test_the_report_of_a_named_sweep_says_what_each_name_sets_and_what_all_share(named_sweep,
                                                                                tmp_path):
    assert main(["compare", str(named_sweep), "--out", str(tmp_path / "cmp")]) == 0
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "- **Settings** differ in " in report and "- **One setting**" not in report
    assert ("- **FO-MAML** (a named setting of the sweep) sets `algorithm.name=fedmeta`, "
            "`algorithm.scale_by_beta=false`.") in report


def test_batched_runs_report_their_share_of_the_batch_wall_time(tmp_path):
    """Runs trained together by `fedmaml sweep --vectorize` all record the batch's wall time: the
    wall-time column shows each run's share (batch time / runs in the batch), marked, with a note;
    runs made one by one keep their own time."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path)}))
    base, spec = load_sweep(cfg, grid_args=["beta=0.3,0.9"], seeds="0-1")
    result = run_sweep(base, spec, tmp_path / "batched", quiet=True, vectorize=True)
    assert not result.failed
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "batched").glob("*/summary.json")]
    assert len(summaries) == 4 and all(s["batch"]["runs"] == 4 for s in summaries)
    c = build_comparison([tmp_path / "batched"])
    for setting, stats in zip(c.settings, c.stats):
        own = [json.loads((r.dir / "summary.json").read_text()) for r in setting.runs]
        assert stats.seconds.values == pytest.approx([s["seconds"] / 4 for s in own])
        assert stats.batched == 2
        by_time = setting_curve(setting, c.metric, "seconds")
        assert by_time.x[-1] == pytest.approx(np.mean([s["seconds"] / 4 for s in own]), rel=0.05)
    table = markdown_table(c)
    assert table.count(" * |") == 2
    assert any("vectorized batches" in n and "divided by its runs" in n for n in c.notes)
    # One batch held every run: its time was measured once, so no spread over seeds is stated (a
    # "± 0" would read as seeds that agree); the legend says why.
    for setting, stats in zip(c.settings, c.stats):
        assert stats.seconds.shared and math.isnan(stats.seconds.std)
        assert f"| {stats.seconds.mean:.3g} * |" in table, table
    assert "± 0 *" not in table
    assert "* without ±: all of the setting's runs shared one batch" in table_legend(c)

    run_sweep(base, spec, tmp_path / "alone", quiet=True)  # one by one: no mark, no note
    alone = build_comparison([tmp_path / "alone"])
    assert all(st.batched == 0 for st in alone.stats) and " * |" not in markdown_table(alone)
    assert not any("vectorized" in n for n in alone.notes)
    assert not any(st.seconds.shared for st in alone.stats) and "without ±" not in table_legend(alone)
    run = alone.settings[0].runs[0]
    assert alone.stats[0].seconds.values[0] == json.loads(
        (run.dir / "summary.json").read_text())["seconds"]


def test_the_client_figure_says_how_many_clients_and_seeds_it_pooled(runs, tmp_path):
    """The per-client figure pools each setting's seeds: its legend counts clients per run and
    seeds ("4 clients × 3 seeds"), not the pooled values as if they were clients."""
    import matplotlib

    from fedmaml.results.compare_plots import plot_client_distribution

    c = build_comparison([runs / "sweep"], metric="unseen.loss")
    per_run = {len([v for v in metric_values_list(r.dir, "unseen.loss.clients")[-1] if v is not None])
               for s in c.settings for r in s.runs}
    assert len(per_run) == 1
    (clients,) = per_run
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text in the SVG
        (svg,) = plot_client_distribution(c, tmp_path, formats=("svg",))
    text = svg.read_text()
    for setting in c.settings:
        assert f"{setting.label} ({clients} clients × 3 seeds)" in text
    assert f"({3 * clients} clients)" not in text


def metric_values_list(run_dir: Path, key: str) -> list:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["eval"][key] for r in rows if key in r.get("eval", {})]


def test_a_reference_is_shown_only_beside_the_metric_it_is_a_value_of(named_sweep, tmp_path):
    """The sweep's references say which metric they are values of: beside another metric (a
    training loss, other clients) they are left out, and the legend says where they belong; a
    setting trained for other rounds than its reference's budget is said in the legend."""
    def table_of(c):
        table = markdown_table(c)
        rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
        return table, rows, table_legend(c)

    # seen.loss.mean (the default): slow's and fast's references; fast trained 4 rounds, not 100
    table, rows, legend = table_of(build_comparison([named_sweep]))
    assert table.splitlines()[0].endswith("| Reference |")
    assert rows["slow, algorithm.alpha=0.02"].endswith("| 0.456 at 4 rounds (elsewhere) |")
    assert "Reference: a value of seen.loss.mean reported elsewhere" in legend
    for alpha in (0.01, 0.02):
        assert (f"Reference note: fast, algorithm.alpha={alpha} trained 4 rounds; its reference is "
                "for 100 or 200 (its `rounds` in sweep.references): another budget") in legend
    assert "slow, algorithm.alpha=0.01 trained" not in legend  # 4 rounds, as its reference states
    assert ("Reference note: the references of FO-MAML are values of unseen.loss.mean, not of "
            "seen.loss.mean: not shown (--metric unseen.loss.mean shows them)") in legend

    # a training loss: no reference is a value of it, so no column
    for metric in ("loss_after", "seen.loss.p50"):
        table, rows, legend = table_of(build_comparison([named_sweep], metric=metric))
        assert "Reference |" not in table and "0.123" not in table and "0.456" not in table
        assert (f"the references of slow, fast are values of seen.loss.mean, not of "
                f"{build_comparison([named_sweep], metric=metric).metric.key}: not shown") in legend

    # unseen clients: FO-MAML's, and no budget remark (its reference states none)
    table, rows, legend = table_of(build_comparison([named_sweep], metric="unseen.loss"))
    assert rows["FO-MAML, algorithm.alpha=0.02"].endswith("| 0.789 on unseen clients |")
    assert rows["slow, algorithm.alpha=0.01"].endswith("| - |")
    assert "trained 4 rounds" not in legend

    # A reference of text alone (a sweep made before references said their metric) is of no
    # known metric: shown beside none, and the legend says how to show it.
    old = tmp_path / "old"
    shutil.copytree(named_sweep, old)
    manifest = yaml.safe_load((old / "sweep.yaml").read_text())
    manifest["sweep"]["references"] = {"fast": "0.123 at 100 rounds (elsewhere)"}
    (old / "sweep.yaml").write_text(yaml.safe_dump(manifest))
    table, rows, legend = table_of(build_comparison([old]))
    assert "Reference |" not in table and "0.123" not in table
    assert ("the references of fast do not say which metric they are values of: not shown (give "
            "each its `metric` in sweep.references)") in legend

    # A references section this version cannot read (a hand-edited manifest): none is shown, and
    # the legend says why.
    manifest["sweep"]["references"] = {"nobody": "0.5"}
    (old / "sweep.yaml").write_text(yaml.safe_dump(manifest))
    table, rows, legend = table_of(build_comparison([old]))
    assert "Reference |" not in table
    assert "Reference note: no reference is shown: " in legend and "nobody" in legend


def test_the_table_as_csv_json_and_latex_holds_the_comparisons_numbers(runs, tmp_path, capsys):
    """--table-format writes the table beside the report: CSV and JSON with every number at full
    precision (mean, std and n over seeds, per-seed values), LaTeX as a booktabs tabular with
    mean \\pm std and the best mean in bold."""
    import csv

    out = tmp_path / "cmp"
    assert main(["compare", str(runs / "sweep"), "--out", str(out), "--table-format", "csv",
                 "--table-format", "tex", "--table-format", "json"]) == 0
    printed = capsys.readouterr().out
    c = build_comparison([runs / "sweep"])
    stem = out / "table-seen.loss.mean"
    for ext in ("csv", "tex", "json"):
        assert f"table: {stem}.{ext}" in printed
        assert f"[table-seen.loss.mean.{ext}](table-seen.loss.mean.{ext})" in \
            (out / "report.md").read_text()

    rows = list(csv.DictReader((out / "table-seen.loss.mean.csv").open()))
    doc = json.loads((out / "table-seen.loss.mean.json").read_text())
    assert doc["metric"]["key"] == "seen.loss.mean" and doc["target"]["value"] == c.target
    assert [r["setting"] for r in rows] == [s["setting"] for s in doc["settings"]] == [
        "beta=0.3", "beta=0.9"]
    for row, record, setting, st in zip(rows, doc["settings"], c.settings, c.stats):
        per_seed = [metric_values(r.dir) for r in setting.runs]
        finals = [v[max(v)] for v in per_seed]
        assert row["algorithm.beta"] == str(setting.values["algorithm.beta"])
        assert row["runs"] == "3" and row["seeds"] == "0;1;2" and row["final_n"] == "3"
        assert record["runs"] == 3 and record["seeds"] == [0, 1, 2]
        # the same numbers, exactly: nothing rounded on the way out
        for name in ("before", "final", "best", "bytes", "samples"):
            stat = getattr(st, name)
            assert float(row[f"{name}_mean"]) == record[name]["mean"] == stat.mean, name
            assert float(row[f"{name}_std"]) == record[name]["std"] == stat.std, name
        assert record["final"]["values"] == finals
        assert float(row["final_mean"]) == pytest.approx(np.mean(finals), rel=1e-12)
        assert float(row["rounds_to_target"]) == record["rounds_to_target"] == st.rounds_to_target
        assert row["seconds_shared"] == "false" and row["reference_text"] == ""
        assert record["reference"] is None

    tex = (out / "table-seen.loss.mean.tex").read_text()
    body = tex[tex.index("\\begin{tabular}{lrrrrrrrr}"):]
    assert body.splitlines()[1:4] == ["\\toprule", "Setting & Runs & Before training & Final & "
                                      "Best & Rounds to target & Samples to target & Wall time (s) & "
                                      "Communicated \\\\", "\\midrule"]
    assert body.rstrip().endswith("\\bottomrule\n\\end{tabular}")
    cells = {line.split(" & ")[0]: line.split(" & ") for line in body.splitlines()[4:6]}
    best = min(range(2), key=lambda i: c.stats[i].final.mean)
    for i, (setting, st) in enumerate(zip(c.settings, c.stats)):
        final = cells[setting.label][3]
        decimals = max(0, 1 - math.floor(math.log10(st.final.std)))
        mean = f"{st.final.mean:.{decimals}f}"
        assert final == (f"$\\mathbf{{{mean}}} \\pm {st.final.std:.{decimals}f}$" if i == best
                         else f"${mean} \\pm {st.final.std:.{decimals}f}$")
    assert tex.startswith("% fedmaml compare: personalized loss, trained clients")
    assert tex_escape("lr_decay & 50% ± #1") == "lr\\_decay \\& 50\\% $\\pm$ \\#1"


def test_a_metric_without_a_value_is_empty_in_csv_and_null_in_json(runs, tmp_path):
    result = compare([runs / "sweep"], out_dir=tmp_path, metric="seen.memory-loss",
                     table_formats=["json", "csv"])
    assert [p.name for p in result.tables] == ["table-seen.memory-loss.mean.json",
                                               "table-seen.memory-loss.mean.csv"]
    doc = json.loads(result.tables[0].read_text())
    assert all(s["before"] == {"mean": None, "std": None, "n": 0, "values": [None] * 3}
               for s in doc["settings"])
    assert "NaN" not in result.tables[0].read_text() and "nan" not in result.tables[1].read_text()
    import csv

    rows = list(csv.DictReader(result.tables[1].open()))
    assert all(r["before_mean"] == "" and r["before_n"] == "0" for r in rows)
    with pytest.raises(CompareError, match=r"--table-format: 'xlsx' is not allowed; allowed: csv, "
                                           r"tex, json"):
        compare([runs / "sweep"], out_dir=tmp_path, table_formats=["xlsx"])


def test_every_table_format_renders_one_comparison(runs, tmp_path, monkeypatch):
    """The formats render the comparison computed once: asking for all of them computes no
    statistic more than asking for none."""
    import fedmaml.results.compare as compare_module

    calls = []
    original = compare_module.setting_stats

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(compare_module, "setting_stats", counted)
    compare([runs / "sweep"], out_dir=tmp_path / "none")
    alone = len(calls)
    calls.clear()
    compare([runs / "sweep"], out_dir=tmp_path / "all", table_formats=TABLE_FORMATS)
    assert len(calls) == alone


def test_every_numeric_evaluation_key_a_run_records_is_a_metric_a_reference_may_name(
        runs, named_sweep):
    """sweep.references checks a reference's metric against the groups and statistics that runs
    record (fedmaml/sweep_spec.py): a statistic recorded but missing there would be refused."""
    from fedmaml.sweep_spec import check_metric_key

    keys = {k for d in [*runs.rglob("metrics.jsonl"), *named_sweep.rglob("metrics.jsonl")]
            for row in map(json.loads, d.read_text().splitlines())
            for k, v in row.get("eval", {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k.count(".") == 2}
    assert {k.split(".")[0] for k in keys} >= {"seen", "unseen", "memory"}  # the check sees them
    for key in sorted(keys):
        assert check_metric_key(key, "test") == key
