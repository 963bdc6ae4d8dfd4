"""``fedmaml.run`` (fedmaml/api.py) goes through the checks of ``fedmaml run``: a given run directory
that holds a run is refused rather than overwritten, ``resume=True`` continues an interrupted run
from its checkpoint and ``restart=True`` moves the old directory aside; Ctrl-C raises
``KeyboardInterrupt`` once the run is saved, so a loop over runs stops, and other stops return;
its signature is its own (``help(fedmaml.run)``), the one docs/custom.md shows; a mistyped keyword
is answered with the closest argument or key."""

from __future__ import annotations

import inspect
import os
import pydoc
import re
import signal
from pathlib import Path

import pytest

import fedmaml
from fedmaml.errors import ConfigError, FedmamlError
from fedmaml.federated import checkpoint, health
from fedmaml.results.compare import find_run_dirs
from fedmaml.results.run_files import read_metrics, read_summary
from tests.test_checkpoint import without_timing

ROOT = Path(__file__).resolve().parents[1]
# MOML (client memories) with Adam on the server (optimizer state): what a resume must carry over.
BASE = ("algorithm.name=moml", "federated.rounds=5", "federated.eval_every=2",
        "federated.server_optimizer=adam", "federated.server_lr=0.01")


def test_a_given_run_dir_holding_a_run_is_refused_and_restart_moves_it_aside(tiny_config,
                                                                             tmp_path):
    # a finished run with a baseline, then another config given the same directory
    first = tiny_config(*BASE, "compare_with=fedavg")
    run_dir = fedmaml.run(first, run_dir=tmp_path / "x", quiet=True)
    summary = (run_dir / "summary.json").read_bytes()
    other = tiny_config(*BASE, "seed=7")
    with pytest.raises(FedmamlError) as refused:
        fedmaml.run(other, run_dir=run_dir, quiet=True)
    message = str(refused.value)
    assert f"run_dir {run_dir}: already holds a run that ended (completed)" in message, message
    assert f"`fedmaml.run(..., run_dir={str(run_dir)!r}, restart=True)`" in message, message
    assert "resume=True" not in message  # nothing in it to resume
    assert (run_dir / "summary.json").read_bytes() == summary  # nothing was touched

    # restart=True: the old run (and its baseline) moves aside; only the new run is compared
    assert fedmaml.run(other, run_dir=run_dir, restart=True, quiet=True) == run_dir
    assert read_summary(run_dir)["status"] == "completed"
    assert not (run_dir / "baselines").exists()
    old = tmp_path / ".x.old-1"
    assert (old / "summary.json").read_bytes() == summary
    assert (old / "baselines" / "fedavg" / "summary.json").exists()
    assert find_run_dirs([tmp_path]) == [run_dir.resolve()]

    # a directory of something else is not a run to replace, resume or move aside
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    for flags in ({}, {"resume": True}, {"restart": True}):
        with pytest.raises(FedmamlError, match="holds files but no run"):
            fedmaml.run(other, run_dir=tmp_path / "notes", quiet=True, **flags)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def _interrupt_the_second_run_at_round(monkeypatch, at: int) -> None:
    """A real SIGINT, as Ctrl-C sends it, when the second run of this process records round
    ``at`` (the run checks for a stop once per round, after recording it)."""
    observe, seen = health.RunHealth.observe, []

    def observe_then_interrupt(self, row, last_error=""):
        observe(self, row, last_error)
        if row["round"] == at:
            seen.append(row)
            if len(seen) == 2:
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(health.RunHealth, "observe", observe_then_interrupt)


def test_ctrl_c_stops_a_loop_of_runs_and_resume_true_continues_it(tiny_config, tmp_path,
                                                                   monkeypatch, capsys):
    cfg = tiny_config(*BASE)
    runs = {seed: tmp_path / f"seed{seed}" for seed in (0, 1, 2)}
    _interrupt_the_second_run_at_round(monkeypatch, 2)
    done = []
    with pytest.raises(KeyboardInterrupt) as stopped:
        for seed, run_dir in runs.items():
            fedmaml.run(cfg, run_dir=run_dir, quiet=True, seed=seed)
            done.append(seed)
    monkeypatch.undo()
    assert done == [0]  # the loop stopped at the interrupted run
    assert str(stopped.value) == (f"{runs[1]}: interrupted, with a checkpoint; `fedmaml.run(..., "
                                  f"run_dir={str(runs[1])!r}, resume=True)` continues it")
    summary = read_summary(runs[1])
    assert summary["status"] == "interrupted"
    # the run's own files word the advice one way, whoever started the run (the CLI's)
    assert summary["message"].endswith(f"resume with `fedmaml run --resume {runs[1]}`"), summary
    assert checkpoint.load(runs[1])["round"] >= 2
    assert not runs[2].exists()

    # the same loop with resume=True: the finished run is left, the stopped one continues from its
    # checkpoint to the numbers of a run never stopped, the one not started starts
    capsys.readouterr()
    for seed, run_dir in runs.items():
        assert fedmaml.run(cfg, run_dir=run_dir, resume=True, seed=seed) == run_dir
    err = capsys.readouterr().err
    assert f"{runs[0]}: nothing to resume: the run already ended (completed)" in err, err
    assert [read_summary(d)["status"] for d in runs.values()] == ["completed"] * 3
    whole = fedmaml.run(cfg, run_dir=tmp_path / "whole", quiet=True, seed=1)
    assert [without_timing(r) for r in read_metrics(runs[1])] == \
        [without_timing(r) for r in read_metrics(whole)]


def test_ctrl_c_at_a_runs_last_round_stops_the_loop_too(tiny_config, tmp_path, monkeypatch):
    """Too late to stop the run (its last round): it completes, and the loop stops all the same."""
    cfg = tiny_config(*BASE)
    _interrupt_the_second_run_at_round(monkeypatch, cfg.federated.rounds)
    done = []
    with pytest.raises(KeyboardInterrupt, match="stopped as the run ended"):
        for seed in (0, 1, 2):
            fedmaml.run(cfg, run_dir=tmp_path / f"seed{seed}", quiet=True, seed=seed)
            done.append(seed)
    assert done == [0]
    assert read_summary(tmp_path / "seed1")["status"] == "completed"
    assert not (tmp_path / "seed2").exists()
    assert not checkpoint.stop_requested()  # the next call starts afresh


def test_a_resume_takes_the_run_dirs_config_and_refuses_another(tiny_config, tmp_path,
                                                                 monkeypatch):
    cfg = tiny_config(*BASE)
    _interrupt_the_second_run_at_round(monkeypatch, 2)
    fedmaml.run(cfg, run_dir=tmp_path / "a", quiet=True)
    with pytest.raises(KeyboardInterrupt):
        fedmaml.run(cfg, run_dir=tmp_path / "cut", quiet=True)
    monkeypatch.undo()
    # the same check as `fedmaml run --resume`, with the advice in fedmaml.run's arguments
    with pytest.raises(FedmamlError) as refused:
        fedmaml.run(cfg, run_dir=tmp_path / "cut", resume=True, quiet=True, seed=5)
    assert "seed: 0 in the checkpoint, 5 now" in str(refused.value)
    assert (f"e.g. `fedmaml.run(..., run_dir={str(tmp_path / 'cut')!r}, resume=True, "
            '**{"federated.rounds": N})`') in str(refused.value)
    # and a run given to it without resume=True is refused, offering both ways on
    with pytest.raises(FedmamlError, match=r"already holds an unfinished run, which a new run "
                                           r"would overwrite; resume=True continues it"):
        fedmaml.run(cfg, run_dir=tmp_path / "cut", quiet=True)
    # config=None: the run directory's config.yaml, as `fedmaml run --resume` takes it
    assert fedmaml.run(run_dir=tmp_path / "cut", resume=True, quiet=True,
                       **{"federated.rounds": 6}) == tmp_path / "cut"
    assert read_summary(tmp_path / "cut")["status"] == "completed"
    assert read_metrics(tmp_path / "cut")[-1]["round"] == 6
    # a run that ended is another run's when the config differs: refused, not returned as it
    with pytest.raises(FedmamlError, match=r"ended \(completed\) as a run of another config "
                                           r"\(seed: 0 there, 5 now\)"):
        fedmaml.run(cfg, run_dir=tmp_path / "a", resume=True, quiet=True, seed=5)
    with pytest.raises(FedmamlError, match="config=None with resume=True runs the config.yaml of "
                                           "run_dir"):
        fedmaml.run(run_dir=tmp_path / "new", resume=True, quiet=True)


def test_other_stops_return_the_run_dir(tiny_config, tmp_path):
    # a run its health rules stop (diverged) ends as the summary says; no KeyboardInterrupt
    run_dir = fedmaml.run(tiny_config("algorithm.eta=1e6"), run_dir=tmp_path / "d", quiet=True)
    assert read_summary(run_dir)["status"] == "diverged"


def test_help_shows_the_signature_custom_md_documents():
    signature = inspect.signature(fedmaml.run)
    assert list(signature.parameters) == ["config", "model", "algorithm", "run_dir", "resume",
                                          "restart", "quiet", "overrides"]
    assert "run_dir: 'str | Path | None' = None" in pydoc.render_doc(fedmaml.run)
    from fedmaml import run

    assert run is fedmaml.run and "run" in dir(fedmaml)
    plain = signature.replace(return_annotation=inspect.Signature.empty, parameters=[
        p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()])
    text = (ROOT / "docs" / "custom.md").read_text(encoding="utf-8")
    assert re.findall(r"^fedmaml\.run\(.*$", text, re.M) == [f"fedmaml.run{plain}"]


@pytest.mark.parametrize("keyword,hint", [
    ("rundir", "did you mean 'run_dir'?"),
    ("rounds", "did you mean **{'federated.rounds': ...}?"),
    ("quite", "did you mean 'quiet'?"),
])
def test_a_mistyped_keyword_is_answered_with_the_closest(keyword, hint, tiny_config):
    with pytest.raises(ConfigError) as refused:
        fedmaml.run(tiny_config(), **{keyword: "x"})
    assert str(refused.value).startswith(f"fedmaml.run: {keyword}=: not an argument of "
                                         "fedmaml.run (config, model, algorithm, run_dir, ")
    assert str(refused.value).endswith(hint)


def test_resume_and_restart_need_a_run_dir_and_one_another_not(tiny_config):
    with pytest.raises(FedmamlError, match="resume=True needs run_dir="):
        fedmaml.run(tiny_config(), resume=True)
    with pytest.raises(FedmamlError, match="not both"):
        fedmaml.run(tiny_config(), run_dir="x", resume=True, restart=True)
