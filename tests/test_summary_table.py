"""The table `fedmaml run` prints (fedmaml.experiment.format_summary): every metric before and after
training for trained and unseen clients, mean ± std over clients as summary.json holds them, a
legend line per column, and the evaluation pattern of each column (a Lambda pattern selected during
the run is shown as `before -> after`)."""

from __future__ import annotations

import logging

from fedmaml.config import replace_paths
from fedmaml.experiment import format_summary, run_experiment
from fedmaml.federated.setup import pattern_step_warnings
from fedmaml.results.recorder import read_summary


def _row(table: str, algorithm_line: int, clients: str, source: str) -> list[str]:
    """The cells of the row for (clients, source) in the block that starts at ``algorithm_line``,
    cut where the header's columns are."""
    lines = table.splitlines()
    head = lines[1]
    c, s = head.index("clients"), head.index("adapted from")
    b = head.index("before training") + len("before training")
    a = head.index("after training") + len("after training")
    for line in lines[algorithm_line:]:
        if line[c:s].strip() == clients and line[s:b - 17].strip() == source:
            return [line[b - 17:b].strip(), line[b:a].strip(), line[a:].strip()]
    raise AssertionError(f"no row {clients} / {source} in\n{table}")


def test_the_table_shows_before_and_after_with_spread_legend_and_patterns(tiny_config, tmp_path):
    cfg = replace_paths(tiny_config("algorithm.name=moml"), {"compare_with": "fedavg"})
    run_dir = run_experiment(cfg, quiet=True, run_dir=tmp_path / "run")
    table = format_summary([run_dir, run_dir / "baselines" / "fedavg"])
    lines = table.splitlines()
    assert lines[0].startswith("personalized loss after 2 adaptation steps, mean ± std over clients")
    starts = {line.split()[0]: i for i, line in enumerate(lines) if line[:1].strip()
              and line.split()[0] in ("moml", "fedavg")}
    for algorithm, d in (("moml", run_dir), ("fedavg", run_dir / "baselines" / "fedavg")):
        s = read_summary(d)
        for clients, group in (("trained", "seen"), ("unseen", "unseen")):
            before, after, pattern = _row(table, starts[algorithm], clients, "w (meta-model)")
            b, a = s["before"], s["after"]
            assert before == f"{b[f'{group}.loss.mean']:.4g} ± {b[f'{group}.loss.std']:.2g}"
            assert after == f"{a[f'{group}.loss.mean']:.4g} ± {a[f'{group}.loss.std']:.2g}"
            assert pattern == "full"
    # MOML's memories: none before training, measured after it; FedAvg has no memory row.
    before, after, _ = _row(table, starts["moml"], "trained", "memory")
    a = read_summary(run_dir)["after"]
    assert before == "-" and after == f"{a['seen.memory-loss.mean']:.4g} ± " \
                                      f"{a['seen.memory-loss.std']:.2g}"
    fedavg_block = lines[starts["fedavg"]:lines.index("columns:")]
    assert not any("memory" in line for line in fedavg_block)
    legend = "\n".join(lines[lines.index("columns:"):])
    for column in ("clients ", "adapted from ", "before/after ", "pattern "):
        assert f"\n  {column}" in legend, column
    assert "the same before and after" in legend


def test_a_pattern_selected_during_the_run_is_shown_as_before_and_after(tiny_config, tmp_path):
    cfg = tiny_config("algorithm.name=moml", "federated.rounds=4", "pattern_selection.mode=central",
                      "pattern_selection.at_round=1", "pattern_selection.repeats=1",
                      "pattern_selection.warmup=0", "pattern_selection.validation_clients=2")
    run_dir = run_experiment(cfg, quiet=True, run_dir=tmp_path / "run")
    chosen = read_summary(run_dir)["pattern_selection"]["chosen"]
    table = format_summary([run_dir])
    _, _, pattern = _row(table, 3, "unseen", "w (meta-model)")
    # The choice depends on measured times: full (nothing switched) or a faster pattern.
    if chosen == "full":
        assert pattern == "full" and "the same before and after" in table
    else:
        assert pattern == f"full -> {chosen}"
        assert "'a -> b': b was selected during training" in table


def _step_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "applies only to the aliases" in r.getMessage()]


def test_a_written_out_evaluation_pattern_reports_and_warns_the_steps_it_runs(tiny_config, tmp_path,
                                                                             caplog):
    # "01" (the tiny MLP has two groups) is one head-only step; evaluation.steps = 2 is for aliases
    cfg = tiny_config("evaluation.pattern=01")
    with caplog.at_level(logging.WARNING, logger="fedmaml"):
        run_dir = run_experiment(cfg, quiet=True, run_dir=tmp_path / "run")
    assert read_summary(run_dir)["eval_steps"] == 1
    table = format_summary([run_dir])
    assert table.splitlines()[0].startswith("personalized loss after 1 adaptation step, ")
    assert "adapted with 1 step on the client's own points" in table
    [warning] = _step_warnings(caplog)
    assert warning.startswith("evaluation.pattern: '01' is written out and runs 1 adaptation "
                              "step; evaluation.steps = 2 applies only to the aliases")
    assert "'01x2'" in warning and "evaluation.steps: 1" in warning


def test_an_alias_or_a_matching_step_count_runs_the_steps_key_without_a_warning(tiny_config,
                                                                               tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fedmaml"):
        head = run_experiment(tiny_config("evaluation.pattern=head", "evaluation.steps=3"),
                              quiet=True, run_dir=tmp_path / "head")
        written = run_experiment(tiny_config("evaluation.pattern=01x3", "evaluation.steps=3",
                                             "algorithm.inner_pattern=11|01",
                                             "algorithm.inner_steps=2"),
                                 quiet=True, run_dir=tmp_path / "written")
    assert read_summary(head)["eval_steps"] == read_summary(written)["eval_steps"] == 3
    assert format_summary([head]).startswith("personalized loss after 3 adaptation steps, ")
    assert _step_warnings(caplog) == []
    # `none` (no adaptation) is chosen, not a count that overrides the steps key by mistake
    assert pattern_step_warnings(tiny_config("evaluation.pattern=none",
                                             "algorithm.inner_pattern=none")) == []


def test_written_out_training_patterns_warn_when_inner_steps_differs(tiny_config, tmp_path, caplog):
    cfg = tiny_config("algorithm.inner_pattern=11x3", "algorithm.memory_pattern=01",
                      "algorithm.inner_steps=2")
    with caplog.at_level(logging.WARNING, logger="fedmaml"):
        run_experiment(cfg, quiet=True, run_dir=tmp_path / "run")
    inner, memory = _step_warnings(caplog)
    assert inner.startswith("algorithm.inner_pattern: '11x3' is written out and runs 3 adaptation "
                            "steps; algorithm.inner_steps = 2 applies only to the aliases")
    assert memory.startswith("algorithm.memory_pattern: '01' is written out and runs 1 adaptation "
                             "step; algorithm.inner_steps = 2 applies only to the aliases")


def test_a_selected_pattern_with_other_steps_is_said_in_the_header(tiny_config, tmp_path):
    # A selection that applies to evaluation switched the later evaluations to 3 head steps (as
    # summary.json records a choice: its canonical text); the first ones ran 2 (full).
    import json

    run_dir = run_experiment(tiny_config("pattern_selection.mode=central"), quiet=True,
                             run_dir=tmp_path / "run")
    summary = read_summary(run_dir)
    summary["pattern_selection"] = {**summary.get("pattern_selection", {}), "chosen": "01x3"}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    table = format_summary([run_dir])
    assert table.splitlines()[0].startswith("personalized loss after 2 or 3 adaptation steps (each "
                                            "column's pattern has its own), ")
    assert _row(table, 3, "trained", "w (meta-model)")[2] == "full -> 01x3"


def test_a_long_algorithm_name_gets_a_column_that_fits_it(tiny_config, tmp_path):
    # an algorithm by its import path (here the built-in MOML's), as a user's own is named
    name = "fedmaml.algorithms.moml:MOML"
    cfg = replace_paths(tiny_config(f"algorithm.name={name}"), {"compare_with": "fedavg"})
    run_dir = run_experiment(cfg, quiet=True, run_dir=tmp_path / "run")
    table = format_summary([run_dir, run_dir / "baselines" / "fedavg"])
    lines = table.splitlines()
    head, rows = lines[1], lines[3:lines.index("columns:")]
    clients = head.index("clients")
    assert clients >= len(name) + 2 and head[clients - 2:clients] == "  "
    named = [line for line in rows if line.startswith(name)]
    assert named and named[0][len(name):clients].strip() == "" and named[0][clients:].startswith(
        "trained")
    for line in rows:  # every row's cells start under the header's
        if line[clients:].strip():
            assert line[clients - 1] == " " and line[clients:clients + 7] in ("trained", "unseen ")
    assert lines[2] == "-" * len(head)
    legend = "\n".join(lines[lines.index("columns:"):])
    assert f"memory: the memory each client keeps ({name})" in legend
    assert "MOML" not in legend.replace(name, "")
    # the memory row and its numbers are the algorithm's own
    before, after, _ = _row(table, lines.index(named[0]), "trained", "memory")
    mean = read_summary(run_dir)["after"]["seen.memory-loss.mean"]
    assert before == "-" and after.startswith(f"{mean:.4g} ± ")
