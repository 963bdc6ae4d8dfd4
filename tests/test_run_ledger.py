"""A run's ledger (fedmaml/federated/run_ledger.py) on real files: rows written as the typed row
writes them, health stopping the run at the row that says so, a checkpoint whose server state comes
back exactly (under the key names checkpoints always had) and the run's end. The ledger's use by a
run alone and by a batch is tested end to end by test_run_batch.py and test_resume.py."""

from __future__ import annotations

import json

import pytest
import torch

from fedmaml.federated import checkpoint
from fedmaml.federated.health import RunStopped
from fedmaml.federated.run_ledger import RunLedger
from fedmaml.federated.server_state import ServerState
from fedmaml.federated.setup import setup_for
from fedmaml.federated.strategy import MetaStrategy
from fedmaml.results.metrics_row import MetricsRow
from fedmaml.results.recorder import METRICS_FILE, MODEL_FILE, read_summary


def row(r: int, seconds: float, **fields) -> MetricsRow:
    if r == 0:
        return MetricsRow(0, eval={"seen.loss.mean": 1.0}, seconds=seconds)
    out = MetricsRow(r, clients=[0, 1], replies=2, failures=0,
                     failures_by_kind={"error": 0, "timeout": 0, "malformed": 0}, rejected=0,
                     updated=True, samples=10 * r, seconds=seconds, **fields)
    out.set_train({"loss-after": 0.5, "train-seconds-max": 0.01})
    return out


def test_rows_checkpoint_and_resume(tiny_config, tmp_path):
    cfg = tiny_config("federated.rounds=4")
    run_dir = tmp_path / "run"
    strategy = MetaStrategy(setup_for(cfg))
    strategy.w = {k: v + 1 for k, v in strategy.w.items()}  # a state unlike the initial one
    strategy.trained, strategy.touched = {1, 0}, {0, 1, 3}
    ledger = RunLedger(cfg, run_dir, "loss")
    written = ledger.record([row(0, 0.1), row(1, 0.2), row(2, 0.3)])
    lines = (run_dir / METRICS_FILE).read_text().splitlines()
    assert [json.loads(x) for x in lines] == written == [
        row(0, 0.1).as_dict(), row(1, 0.2).as_dict(), row(2, 0.3).as_dict()]
    assert ledger.state["seconds"] == 0.3 and ledger.eval_round == 0
    assert ledger.progress_info(written[-1]) == "eval loss 1 @r0 | train 0.5 | replies 2/2"
    assert not ledger.checkpoint_due(1, stop=False) and ledger.checkpoint_due(1, stop=True)
    assert not ledger.checkpoint_due(4, stop=True)  # never after the last round
    ledger.save_checkpoint(2, strategy.export_state(), {"clients": {}})
    ledger.record([row(3, 0.4)])  # after the checkpoint: a resume drops it

    saved = checkpoint.load(run_dir)["strategy"]  # the names checkpoints always had
    assert list(saved) == ["w", "w_before_update", "optimizer", "trained", "touched", "selector",
                           "totals", "staleness", "privacy"]
    again = RunLedger(cfg, run_dir, "loss", resume=True)
    done, seconds, state, memories = again.resumed
    assert (done, seconds, memories) == (2, 0.3, {"clients": {}})
    assert state.trained == [0, 1] and state.touched == [0, 1, 3]
    for k, v in strategy.w.items():
        assert torch.equal(state.w[k], v)
    assert ServerState.from_checkpoint(state.to_checkpoint()) == state
    assert (run_dir / METRICS_FILE).read_text().splitlines() == lines
    assert again.health.replies == 4 and again.state["first_eval"] == {"seen.loss.mean": 1.0}


def test_a_diverged_row_stops_the_run_and_is_written(tiny_config, tmp_path):
    cfg = tiny_config()
    run_dir = tmp_path / "run"
    ledger = RunLedger(cfg, run_dir, "loss")
    strategy = MetaStrategy(setup_for(cfg))
    ledger.save_checkpoint(1, strategy.export_state(), {"clients": {}})
    with pytest.raises(RunStopped, match="run diverged at round 2: not finite") as stop:
        ledger.record([row(0, 0.1), row(1, 0.2), row(2, 0.3, diverged="not finite"),
                       row(3, 0.4)])
    assert [json.loads(x)["round"] for x in
            (run_dir / METRICS_FILE).read_text().splitlines()] == [0, 1, 2]
    summary = ledger.finish(stop.value.status, stop.value.message, strategy.w,
                            strategy.summary_parts(), extra={"batch": {"runs": 1}})
    assert {k: v for k, v in read_summary(run_dir).items() if k != "provenance"} == summary
    assert summary["status"] == "diverged" and summary["rounds_completed"] == 1
    assert list(summary)[-2:] == ["participation", "batch"]
    assert not checkpoint.path_of(run_dir).exists()  # nothing to resume
    model = torch.load(run_dir / MODEL_FILE, weights_only=True)
    assert all(torch.equal(model[k], v) for k, v in strategy.w.items())


def test_an_interrupted_run_keeps_its_checkpoint(tiny_config, tmp_path):
    cfg = tiny_config()
    ledger = RunLedger(cfg, tmp_path / "run", "loss")
    strategy = MetaStrategy(setup_for(cfg))
    ledger.record([row(0, 0.1), row(1, 0.2)])
    ledger.save_checkpoint(1, strategy.export_state(), {"clients": {}})
    ledger.finish("interrupted", "interrupted after round 1", strategy.w,
                  strategy.summary_parts())
    assert checkpoint.load(tmp_path / "run")["round"] == 1
    assert read_summary(tmp_path / "run")["status"] == "interrupted"


def test_a_checkpoint_whose_memories_cannot_be_collected_is_skipped(tiny_config, tmp_path):
    from fedmaml.errors import FedmamlError

    cfg = tiny_config()
    ledger = RunLedger(cfg, tmp_path / "run", "loss")
    strategy = MetaStrategy(setup_for(cfg))

    def unreachable():
        raise FedmamlError("client 3 did not answer")

    ledger.save_checkpoint(1, strategy.export_state(), unreachable)
    assert not checkpoint.path_of(tmp_path / "run").exists()


def test_the_figure_draws_what_the_file_holds_also_after_a_resume(tiny_config, tmp_path):
    """The ledger gathers the figure's curves as it writes rows (the end does not read them back):
    what it gathered equals what metrics.jsonl holds, a resumed run's earlier rows included, and
    the figure drawn from either is the same image."""
    from fedmaml.results.plots import Curves, plot_run
    from fedmaml.results.recorder import read_metrics

    cfg = tiny_config("federated.rounds=4")
    run_dir = tmp_path / "run"
    strategy = MetaStrategy(setup_for(cfg))
    ledger = RunLedger(cfg, run_dir, "loss")
    ledger.record([row(0, 0.1), row(1, 0.2), row(2, 0.3)])
    ledger.save_checkpoint(2, strategy.export_state(), {"clients": {}})
    ledger.record([row(3, 0.4)])  # after the checkpoint: the resume drops it
    again = RunLedger(cfg, run_dir, "loss", resume=True)
    again.record([row(3, 0.5), MetricsRow(4, eval={"seen.loss.mean": 0.7}, seconds=0.6)])

    def plain(c: Curves):
        return ({k: (list(r), list(v)) for k, (r, v) in c.train.items()}, c.evaluations)

    from_file = Curves.of(read_metrics(run_dir))
    assert plain(again.curves) == plain(from_file)
    assert [r for r, _ in from_file.evaluations] == [0, 4]
    assert list(from_file.train["loss_after"][0]) == [1, 2, 3]
    a = plot_run(run_dir, tmp_path / "a.png", curves=again.curves)
    b = plot_run(run_dir, tmp_path / "b.png")
    assert a.read_bytes() == b.read_bytes()


def test_a_loss_that_was_not_finite_is_drawn_as_a_gap(tmp_path):
    """metrics.jsonl holds a NaN or infinite loss as null (fedmaml/results/recorder.py); the figure
    reads it back as NaN, a gap in the curve, the same as from the rows the run gathered."""
    import math

    from fedmaml.results.plots import Curves, plot_run
    from fedmaml.results.recorder import read_metrics

    rows = [{"round": 0, "eval": {"seen.loss.mean": 2.0}},
            {"round": 1, "loss_after": 1.5}, {"round": 2, "loss_after": None},
            {"round": 3, "loss_after": float("inf")}]
    (tmp_path / METRICS_FILE).write_text("".join(
        json.dumps({**r, "loss_after": None} if r.get("loss_after") == float("inf") else r) + "\n"
        for r in rows))
    from_file = Curves.of(read_metrics(tmp_path))
    rounds, values = from_file.train["loss_after"]
    assert list(rounds) == [1, 2, 3]
    assert values[0] == 1.5 and math.isnan(values[1]) and math.isnan(values[2])
    gathered = Curves.of([rows[0], rows[1], {"round": 2, "loss_after": math.nan}, rows[3]])
    assert list(gathered.train["loss_after"][0]) == [1, 2, 3]
    out = plot_run(tmp_path)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
