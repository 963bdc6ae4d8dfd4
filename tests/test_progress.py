"""Progress output: a live bar on a terminal, plain lines elsewhere, quiet on request; and the CLI
stopping quietly when its reader goes away."""

from __future__ import annotations

import io
import os
import sys

from fedmaml.cli import main
from fedmaml.results.progress import Progress, configure


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
    assert lines[0] == "round 0/100 | loss 0 | 0s elapsed | ETA -"  # no "nan" before a step
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
