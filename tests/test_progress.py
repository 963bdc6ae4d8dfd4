"""Progress output: a live bar on a terminal, plain lines elsewhere, quiet on request; and the CLI
stopping quietly when its reader goes away."""

from __future__ import annotations

import io
import os
import sys

import pytest

from fedmaml.cli import main
from fedmaml.results.progress import Progress, configure, status


def lines_of(total: int, steps, **kwargs) -> list[str]:
    out = io.StringIO()
    progress = Progress(total, stream=out, **kwargs)
    for done in steps:
        progress.update(done, f"loss {done}")
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text  # a log file gets no terminal control codes
    return text.splitlines()


def test_lines_every_tenth_by_default_with_the_first_and_last():
    lines = lines_of(100, range(101), seconds=3600)
    assert [int(line.split()[1].split("/")[0]) for line in lines] == list(range(0, 101, 10))
    assert lines[0] == "round 0/100 | loss 0 | 0s elapsed | ETA --"  # no "nan" before a step
    assert lines[-1].startswith("round 100/100 | loss 100 | ") and lines[-1].endswith("ETA 0s")


def test_lines_every_n_steps_or_t_seconds():
    assert len(lines_of(100, range(101), every=25, seconds=3600)) == 5  # 0, 25, 50, 75, 100
    assert len(lines_of(100, range(101), every=1000, seconds=0)) == 101  # time rule: every step
    configure(every=50)
    try:
        assert len(lines_of(100, range(101), seconds=3600)) == 3  # 0, 50, 100
    finally:
        configure(every=0)


def test_quiet_writes_nothing():
    assert lines_of(10, range(11), quiet=True) == []
    out = io.StringIO()
    Progress(10, stream=out, quiet=True, bar=True).update(5)
    assert out.getvalue() == ""


def test_terminal_bar_shows_step_info_and_eta():
    out = io.StringIO()
    with Progress(4, stream=out, bar=True) as progress:
        for done in range(3):
            progress.update(done, "train loss 0.5 | replies 3/3, 1 failed")
    text = out.getvalue()
    assert "round" in text and "2/4" in text and "replies 3/3, 1 failed" in text and "ETA" in text
    assert "nan" not in text.lower()


class Clock:
    """A time source the test moves by hand: ETAs without relying on timing."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


LONG_INFO = "eval loss 0.4123 @r300 | train 1.234 | replies 10/10, 2 failed"


@pytest.mark.parametrize("width", [80, 60, 40, 24, 12])
def test_the_live_line_fits_the_terminal_and_keeps_step_and_times(width):
    clock = Clock()
    out = io.StringIO()
    progress = Progress(5000, stream=out, bar=True, width=width, clock=clock)
    try:
        clock.now += 30  # warm-up: imports, the first evaluation
        progress.update(0, LONG_INFO)
        clock.now += 2
        progress.update(10, LONG_INFO)  # 0.2 s a round measured: 4990 rounds left = 16m38s
        line = progress.render()
    finally:
        progress.close()
    assert len(line) <= width - 1  # the last column would wrap
    assert line.startswith("round 10/5000"[:width - 1])
    if width >= 40:
        assert line.endswith("32s ETA 16m38s")  # neither cut nor "0:0…"
        assert " eval lo" in line  # the info is shortened before the times are
    if width >= 80:  # what does not fit goes first from the end of the info
        assert "eval loss 0.4123 @r300 | train 1.234 | rep" in line and "…" in line
    if width == 24:
        assert line == "round 10/5000 ETA 16m38s"[:23]
    drawn = out.getvalue().split("\r")
    assert all(len(d.split("\x1b[K")[0]) <= width - 1 for d in drawn)


def test_the_eta_comes_from_measured_steps_only():
    """A sweep whose first run carried a long warm-up must not extrapolate it to the others; no
    ETA at all before a step has been measured."""
    clock = Clock()
    progress = Progress(8, label="run", stream=io.StringIO(), bar=False, clock=clock)
    assert progress.eta(clock.now) == "--"  # nothing measured
    clock.now += 40  # the first run: 40 s, most of it warm-up
    progress.update(1)
    assert progress.eta(clock.now) == "--"  # one update: the warm-up is all there is
    clock.now += 2
    progress.update(3)  # two runs in 2 s: 1 s a run, 5 runs left
    assert progress.eta(clock.now) == "5s"
    clock.now += 3  # time passes within the next run: the ETA counts down
    assert progress.eta(clock.now) == "2s"
    progress.update(8)
    assert progress.eta(clock.now) == "0s"


def test_parallel_workers_first_cluster_of_updates_is_warm_up():
    """Two workers: their first runs end together (0.5 s apart), each with its own start. Measured
    from the first update that cluster would promise 0.5 s a run; from the second, the real rate."""
    clock = Clock()
    progress = Progress(6, label="run", stream=io.StringIO(), bar=False, clock=clock,
                        warmup_updates=2)
    clock.now += 60
    progress.update(1)
    clock.now += 0.5
    progress.update(2)
    assert progress.eta(clock.now) == "--"  # only the warm-up cluster so far
    clock.now += 20
    progress.update(3)  # 20 s for one more run (of two running): 3 runs left
    assert progress.eta(clock.now) == "1m00s"


def test_a_long_phase_says_what_it_does():
    clock = Clock()
    out = io.StringIO()
    with Progress(100, stream=out, bar=True, width=80, clock=clock) as progress:
        progress.update(20, "eval loss 0.5 @r20")
        status("pattern selection: 12 candidates on 4 validation clients")
        assert "pattern selection: 12 candidates" in progress.render()
        progress.update(21, "eval loss 0.5 @r20")  # the next round: the phase is over
        assert "pattern selection" not in progress.render()
        with Progress(10, quiet=True):  # a quiet run inside (of a sweep) keeps its phases
            status("evaluating on 40 clients")
        assert "evaluating" not in progress.render()
    status("nobody listens")  # no progress shown: nothing happens

    log = io.StringIO()  # in a log: a line at the start of a phase, then only after `seconds`
    with Progress(100, stream=log, bar=False, seconds=60, clock=clock) as progress:
        progress.update(0)
        status("pattern selection: 12 candidates on 4 validation clients", force=True)
        status("pattern selection: timing on client 1/4")
        clock.now += 61
        status("pattern selection: timing on client 2/4")
    lines = log.getvalue().splitlines()
    assert [line.split(" | ")[1] for line in lines[1:]] == [
        "pattern selection: 12 candidates on 4 validation clients",
        "pattern selection: timing on client 2/4"]


def test_quiet_runs_print_their_directory_and_nothing_else(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("name: tiny\n")
    args = ["run", str(cfg), f"output_dir={tmp_path / 'runs'}", "data.num_clients=4",
            "data.unseen_clients=0", "model.hidden=[8]", "federated.rounds=2",
            "federated.clients_per_round=2", "federated.eval_every=0",
            "federated.eval_clients=2", "evaluation.steps=1", "--quiet"]
    assert main(args) == 0
    assert main(args) == 0  # the same again: the next free directory
    out, err = capsys.readouterr()
    assert out.splitlines() == [str(tmp_path / "runs" / "tiny"), str(tmp_path / "runs" / "tiny-2")]
    assert err == ""


def test_run_prints_a_line_per_round_when_asked(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("name: tiny\n")
    args = [f"output_dir={tmp_path / 'runs'}", "data.num_clients=6", "data.unseen_clients=0",
            "model.hidden=[8]", "federated.rounds=4", "federated.clients_per_round=2",
            "federated.eval_every=0", "federated.eval_clients=2", "evaluation.steps=1"]
    try:
        assert main(["run", str(cfg), *args, "--progress-every", "1"]) == 0
    finally:
        configure(every=0, seconds=60.0)
    err = capsys.readouterr().err
    rounds = [line for line in err.splitlines() if line.startswith("round ")]
    assert [r.split()[1] for r in rounds] == ["0/4", "1/4", "2/4", "3/4", "4/4"]
    assert "replies 2/2" in rounds[1]
    assert main(["run", str(cfg), "--progress-every", "0"]) == 2  # must be positive


def test_a_closed_pipe_ends_the_command_quietly(capsys):
    """`fedmaml config show | head -1`: the reader is gone; exit 141 like a Unix tool, no
    traceback. A real OS pipe whose read end is closed."""
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    saved = sys.stdout
    sys.stdout = os.fdopen(write_fd, "w")
    try:
        code = main(["config", "show"])
    finally:
        pipe, sys.stdout = sys.stdout, saved
        pipe.close()  # now /dev/null underneath (dup2), so closing cannot fail
    assert code == 141
    assert capsys.readouterr().err == ""


def test_a_progress_that_never_opened_leaves_nothing_behind():
    """A run constructs its progress before its ``with`` block (server_app.py, run_batch.py): an
    error in between must not leave it registered (the outer sweep line would never be drawn
    again, and statuses would go to it) nor leave its ticker thread running."""
    clock = Clock()
    out = io.StringIO()
    with Progress(10, label="run", stream=out, bar=True, width=80, clock=clock) as outer:
        outer.update(1)
        try:
            Progress(100, stream=io.StringIO(), bar=True)  # a run that fails before its block
            raise RuntimeError("setup failed")
        except RuntimeError:
            pass
        status("the next run: evaluating")
        assert "the next run: evaluating" in outer.render()
        clock.now += 1  # past the redraw throttle
        outer.update(2)  # drawn: no leaked inner line holds the terminal
        assert out.getvalue().split("\r")[-1].startswith("run 2/10")
    assert not [t for t in __import__("threading").enumerate() if t.name == "fedmaml-progress"]

    # and one that opened and ended by an exception is gone from the stack too
    with Progress(10, label="run", stream=io.StringIO(), bar=True) as outer:
        with pytest.raises(RuntimeError):
            with Progress(100, stream=io.StringIO(), bar=True):
                raise RuntimeError("a round failed")
        status("still the outer one")
        assert "still the outer one" in outer.render()


def test_quiet_runs_keep_mlflow_quiet_on_a_new_store(tmp_path):
    """MLflow logs "Creating initial MLflow database tables" (and alembic its migrations) at INFO
    the first time a store is used: with --quiet a run prints its directory and nothing else. A
    fresh process, since MLflow configures its loggers when first imported."""
    import subprocess
    from pathlib import Path

    pytest.importorskip("mlflow")
    repo = Path(__file__).resolve().parents[1]
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("name: tiny\n")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_LOGGING_LEVEL"}
    done = subprocess.run(
        [sys.executable, "-m", "fedmaml", "run", str(cfg), f"output_dir={tmp_path / 'runs'}",
         "data.num_clients=4", "data.unseen_clients=0", "model.hidden=[8]", "federated.rounds=1",
         "federated.clients_per_round=2", "federated.eval_every=0", "federated.eval_clients=2",
         "evaluation.steps=1", "tracking.backends=[mlflow]", "--quiet"],
        capture_output=True, text=True, env={**env, "PYTHONPATH": str(repo)}, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "runs" / "mlflow.db").exists()  # the store was created by this run
    assert done.stdout.splitlines() == [str(tmp_path / "runs" / "tiny")]
    assert done.stderr == ""
