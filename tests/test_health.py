"""Run health: a run that diverges or fails says so (status, one line, summary totals, exit code),
keeps its last good model, and sweeps and compare report such runs instead of averaging them in."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from fedmaml.config import dump_yaml
from fedmaml.engines.inprocess import InProcessGrid, run_inprocess
from fedmaml.experiment import run_experiment
from fedmaml.federated import records as R
from fedmaml.federated.client_app import make_client_app
from fedmaml.federated.server_app import make_server_app
from fedmaml.federated.setup import setup_for
from fedmaml.results.compare import build_comparison
from fedmaml.results.compare_report import markdown_table
from fedmaml.results.recorder import read_metrics, read_summary
from test_federated import cli  # the suite's CLI runner (a subprocess)

class TrainGrid(InProcessGrid):
    """The in-process grid, keeping the meta-model each round's train instructions carried."""

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        super().__init__(client_app, num_nodes)
        self.w_sent: dict[int, dict[str, torch.Tensor]] = {}

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            if m.metadata.message_type == "train":
                self.w_sent[int(m.content[R.CONFIG][R.ROUND])] = dict(
                    m.content[R.ARRAYS].to_torch_state_dict())
        return super().send_and_receive(messages, timeout=timeout)


def run_with(cfg, run_dir: Path, app: ClientApp) -> TrainGrid:
    setup = setup_for(cfg)
    num_nodes = setup.federation.num_clients + setup.federation.num_unseen
    grid = TrainGrid(app, num_nodes)
    run_inprocess(make_server_app(cfg, run_dir, quiet=True), app, num_nodes, grid)
    return grid


def wrapped_app(cfg, *, train=None, evaluate=None) -> ClientApp:
    """fedmaml's ClientApp with its train or evaluate replies passed through a function."""
    inner = make_client_app(cfg)
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        reply = inner(msg, context) if train is None else train(msg, context, inner)
        return reply

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        reply = inner(msg, context)
        return reply if evaluate is None else evaluate(msg, reply)

    return app


def model_of(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_completed_run_summary_carries_status_and_totals(tiny_config, tmp_path):
    run_dir = run_experiment(tiny_config(), quiet=True, run_dir=tmp_path / "run")
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and "message" not in summary
    assert summary["replies"] == 9 and summary["rounds_completed"] == 3
    assert summary["failures"] == {"error": 0, "timeout": 0, "malformed": 0}
    assert summary["rejected_updates"] == 0
    for row in read_metrics(run_dir)[1:]:
        assert row["failures_by_kind"] == {"error": 0, "timeout": 0, "malformed": 0}
        assert row["rejected"] == 0 and "diverged" not in row


def test_a_huge_eta_diverges_at_once_and_keeps_the_model_before_the_bad_update(tiny_config,
                                                                               tmp_path, caplog):
    cfg = tiny_config("algorithm.eta=1e6", "federated.rounds=10")
    run_dir = run_experiment(cfg, quiet=True, run_dir=tmp_path / "run")
    summary = read_summary(run_dir)
    rows = read_metrics(run_dir)
    # Round 1's update is finite but huge; from that w every client's update holds NaN/inf.
    assert summary["status"] == "diverged"
    assert summary["message"].startswith("run diverged at round 2: every update that arrived (3) "
                                         "holds NaN or infinite values; try a smaller "
                                         "algorithm.eta (now 1e+06)")
    assert [r["round"] for r in rows] == [0, 1, 2]  # stopped at once, not after 10 rounds
    assert rows[2]["rejected"] == 3 and rows[2]["replies"] == 0
    assert summary["rejected_updates"] == 3 and summary["rounds_completed"] == 1
    # model.pt: the model before the last applied update (round 1's), not the blown-up one
    assert same(model_of(run_dir), setup_for(cfg).initial_params)


def test_a_non_finite_aggregate_stops_the_run_and_w_is_not_changed(tiny_config, tmp_path):
    cfg = tiny_config("federated.rounds=5", "federated.eval_every=0")

    def huge(msg, context, inner):  # finite updates whose weighted sum overflows float32
        reply = inner(msg, context)
        t = {k: torch.full_like(v, 3e38)
             for k, v in reply.content[R.ARRAYS].to_torch_state_dict().items()}
        reply.content[R.ARRAYS] = ArrayRecord(torch_state_dict=t)
        return reply

    run_with(cfg, tmp_path / "run", wrapped_app(cfg, train=huge))
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "diverged"
    assert "round 1: the aggregated update is not finite" in summary["message"]
    assert read_metrics(tmp_path / "run")[1]["updated"] is False
    assert same(model_of(tmp_path / "run"), setup_for(cfg).initial_params)


def test_a_non_finite_evaluation_loss_stops_the_run(tiny_config, tmp_path):
    cfg = tiny_config("federated.rounds=5", "federated.eval_every=1")

    def nan_at_round_3(msg, reply):
        if int(msg.content[R.CONFIG][R.ROUND]) == 3:
            reply.content[R.METRICS] = MetricRecord({**dict(reply.content[R.METRICS]),
                                                      "loss": math.nan})
        return reply

    grid = run_with(cfg, tmp_path / "run", wrapped_app(cfg, evaluate=nan_at_round_3))
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "diverged"
    assert summary["message"].startswith("run diverged at round 3: the evaluation loss "
                                         "(seen.loss.mean, unseen.loss.mean) is not finite")
    # the w that evaluated badly came from round 3's update: model.pt is the one before it
    assert same(model_of(tmp_path / "run"), grid.w_sent[3])
    assert summary["rounds_completed"] == 2


def test_the_divergence_hint_names_the_privacy_noise_when_there_is_noise(tiny_config):
    from fedmaml.federated.run_ledger import run_health

    plain = run_health(tiny_config("algorithm.eta=0.005")).hint
    assert plain == "a smaller algorithm.eta (now 0.005) or federated.server_lr (now 1)"
    clipped = tiny_config("federated.aggregation=uniform", "privacy.clipping=server",
                          "algorithm.eta=0.005")
    assert run_health(clipped).hint == plain  # clipping without noise: as before
    # privacy.md's example: poisson sampling of 10 of 200 clients a round, C = 1, z = 1
    dp = ("federated.aggregation=uniform", "federated.mode=cross_device", "data.num_clients=200",
          "federated.sampling=poisson", "federated.clients_per_round=10",
          "privacy.clipping=server", "privacy.clipping_norm=1", "privacy.noise_multiplier=1",
          "algorithm.eta=0.005")
    hint = run_health(tiny_config(*dp)).hint
    assert hint.startswith("less privacy noise, which algorithm.eta does not change: each round "
                           "adds noise of std z C / d = 1 x 1 / 10 = 0.1 to every coordinate")
    for key in ("privacy.noise_multiplier", "privacy.clipping_norm", "federated.clients_per_round",
                "federated.server_lr (now 1)", "algorithm.eta (now 0.005)"):
        assert key in hint, key
    # cross-silo: the denominator is every silo
    silo = run_health(tiny_config(*dp, "federated.mode=cross_silo", "federated.sampling=fixed",
                                  "federated.clients_per_round=0", "data.num_clients=4",
                                  "privacy.noise_multiplier=2")).hint
    assert "z C / d = 2 x 1 / 4 = 0.5" in silo and "data.num_clients" in silo


def test_a_run_blown_up_by_privacy_noise_says_so(tiny_config, tmp_path):
    cfg = tiny_config("federated.aggregation=uniform", "privacy.clipping=server",
                      "privacy.clipping_norm=1", "privacy.noise_multiplier=1e6")
    run_dir = run_experiment(cfg, quiet=True, run_dir=tmp_path / "run")
    summary = read_summary(run_dir)
    assert summary["status"] == "diverged"
    assert "try less privacy noise" in summary["message"], summary["message"]


def test_rounds_without_a_valid_reply_fail_the_run_after_max_failed_rounds(tiny_config, tmp_path):
    cfg = tiny_config("federated.rounds=10", "faults.fail=1.0")
    run_dir = run_experiment(cfg, quiet=True, run_dir=tmp_path / "run")
    summary = read_summary(run_dir)
    assert summary["status"] == "failed"
    assert summary["message"].startswith("run failed at round 3: no valid reply for 3 consecutive "
                                         "rounds (last error: client error: InjectedFault: "
                                         "injected failure (faults.fail)")
    assert summary["failures"] == {"error": 9, "timeout": 0, "malformed": 0}
    assert summary["replies"] == 0 and summary["rounds_completed"] == 3
    assert len(read_metrics(run_dir)) == 4


def test_a_run_whose_rounds_never_got_a_valid_reply_fails_whatever_max_failed_rounds_is():
    """Fewer rounds than ``max_failed_rounds``, none with a valid reply: failed at the last round.
    One valid reply in any round is enough to complete (its losses say the rest)."""
    from fedmaml.federated.health import RunHealth, RunStopped

    def rows(replies):
        return [{"round": 0}] + [{"round": r, "replies": n, "failures_by_kind": {"error": 3 - n}}
                                 for r, n in enumerate(replies, start=1)]

    health = RunHealth(max_failed_rounds=10, rounds=3)
    for row in rows([0, 0]):
        health.observe(row)
    with pytest.raises(RunStopped) as stop:
        health.observe(rows([0, 0, 0])[-1], "client error: boom")
    assert stop.value.status == "failed" and stop.value.round == 3
    assert stop.value.message.startswith("run failed: none of its 3 rounds got a valid reply, so "
                                         "nothing was trained (last error: client error: boom)")
    assert health.totals()["failures"]["error"] == 9
    for replies in ([1, 0, 0], [0, 0, 2]):
        health = RunHealth(max_failed_rounds=10, rounds=3)
        for row in rows(replies):
            health.observe(row)  # completes
    health = RunHealth(max_failed_rounds=10)  # rounds unknown: no such check
    for row in rows([0, 0, 0]):
        health.observe(row)


def test_failed_rounds_must_be_consecutive(tiny_config, tmp_path):
    cfg = tiny_config("federated.rounds=4", "federated.max_failed_rounds=2", "federated.eval_every=0")

    def fail_odd_rounds(msg, context, inner):
        if int(msg.content[R.CONFIG][R.ROUND]) % 2:
            raise RuntimeError("injected")
        return inner(msg, context)

    run_with(cfg, tmp_path / "run", wrapped_app(cfg, train=fail_odd_rounds))
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "completed"
    assert summary["failures"]["error"] == 6 and summary["replies"] == 6


@pytest.mark.slow
def test_cli_exits_1_and_marks_a_run_that_did_not_complete(tiny_config, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_yaml(tiny_config("federated.rounds=6")))
    done = cli("run", str(config), "algorithm.eta=1e6", f"output_dir={tmp_path / 'out'}",
               cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "DIVERGED" in done.stdout and "moml did not complete: run diverged at round 2" in done.stdout
    assert "run diverged at round 2" in done.stderr.splitlines()[-1]
    done = cli("run", str(config), "--quiet", f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_sweep_and_compare_report_runs_that_did_not_complete(tmp_path, tiny_config, capsys):
    from fedmaml.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(dump_yaml(tiny_config("federated.rounds=4")))
    sweep_dir = tmp_path / "sw"
    argv = ["sweep", str(config), "--grid", "eta=0.005,1e6", "--seeds", "0-2",
            "--sweep-dir", str(sweep_dir)]
    assert main(argv) == 1  # every eta=1e6 run diverged
    out = capsys.readouterr()
    assert "3 run(s) diverged (see their summary.json): eta=1e6,seed=0" in out.out
    assert "diverged in" in out.err  # the progress line names the status
    assert main(argv) == 1  # finished (diverged) runs are not run again, still reported
    assert "6 finished already, 0 to run" in capsys.readouterr().err

    # One seed of the good setting "diverged" too (its summary says so, its numbers are garbage):
    # the mean is over the other two seeds, and the table and notes say which seed is left out.
    bad = sweep_dir / "eta=0.005,seed=1"
    summary = json.loads((bad / "summary.json").read_text())
    (bad / "summary.json").write_text(json.dumps({**summary, "status": "diverged"}))
    rows = [json.loads(x) for x in (bad / "metrics.jsonl").read_text().splitlines()]
    rows[-1]["eval"]["seen.loss.mean"] = 1e9
    (bad / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = build_comparison([sweep_dir])
    (setting,) = c.settings  # the eta=1e6 setting has no completed run left
    assert [r.seed for r in setting.runs] == [0, 2]
    finals = [read_metrics(sweep_dir / f"eta=0.005,seed={s}")[-1]["eval"]["seen.loss.mean"]
              for s in (0, 2)]
    assert c.stats[0].final.mean == pytest.approx(sum(finals) / 2)
    assert "| 2 (+1 diverged (seed 1)) |" in markdown_table(c)
    assert any("3 diverged (seeds 0, 1, 2); left out of its numbers (0 of 3 runs completed)" in n
               for n in c.notes)


def test_the_printed_table_says_when_a_completed_run_lost_replies(tiny_config, tmp_path):
    from fedmaml.experiment import format_summary

    cfg = tiny_config("data.num_clients=20", "federated.clients_per_round=10",
                      "federated.round_timeout=60", "faults.fail=0.2", "faults.straggle=0.1")
    run_dir = run_experiment(cfg, quiet=True, run_dir=tmp_path / "run")
    s = read_summary(run_dir)
    lost = s["failures"]["error"] + s["failures"]["timeout"]
    assert lost > 0
    assert (f"moml completed with {lost} replies not used (error {s['failures']['error']}, "
            f"timeout {s['failures']['timeout']}; {s['replies']} used)") in format_summary([run_dir])
    clean = run_experiment(tiny_config(), quiet=True, run_dir=tmp_path / "clean")
    assert "not used" not in format_summary([clean])


def test_metrics_lines_are_strict_json_with_nan_and_inf_as_null(tiny_config, tmp_path):
    """Finite rows take the encoder's fast path; a row with NaN/inf anywhere (nested too) is still
    written as strict JSON with null there, and rows keep their order."""
    from fedmaml.results.recorder import RunRecorder

    recorder = RunRecorder(tmp_path / "run", tiny_config())
    rows = [{"round": 1, "loss_after": 0.5, "clients": [3, 1]},
            {"round": 2, "loss_after": math.nan, "eval": {"seen.loss.mean": math.inf,
                                                          "seen.loss.std": 0.25}},
            {"round": 3, "loss_after": 0.125, "loss_list": [1.0, -math.inf]}]
    recorder.log_rounds(rows)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    parsed = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
              for line in lines]
    assert parsed == [rows[0],
                      {"round": 2, "loss_after": None,
                       "eval": {"seen.loss.mean": None, "seen.loss.std": 0.25}},
                      {"round": 3, "loss_after": 0.125, "loss_list": [1.0, None]}]
    assert read_metrics(tmp_path / "run") == parsed
