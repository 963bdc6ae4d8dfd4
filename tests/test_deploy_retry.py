"""``fedmaml deploy supernode --retry-for``: a SuperNode the SuperLink refuses is started again,
for a bounded time (fedmaml/deploy/retry.py). A small Python program stands in for
``flower-supernode``: it prints Flower's refusal and exits for its first runs, then succeeds. The
refusal from a real SuperLink is covered by the deployment end-to-end test (an unregistered key)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedmaml.deploy.processes import alive
from fedmaml.deploy.retry import REFUSAL, run_retrying
from tests.helpers import SimulatedClock

REFUSED_NODE = """
import sys
import time
from pathlib import Path
runs = Path(sys.argv[1])
n = int(runs.read_text()) if runs.exists() else 0
if len(sys.argv) > 4:  # stays up until the helper of this attempt has started (an event)
    started, give_up = Path(sys.argv[4]), time.monotonic() + 120
    while len(started.read_text().split() if started.exists() else []) <= n:
        assert time.monotonic() < give_up, "the helper never started"
        time.sleep(0.01)
runs.write_text(str(n + 1))
if n < int(sys.argv[2]):
    print("ERROR : Failed to activate SuperNode.", flush=True)
    sys.exit(1)
print("node up", flush=True)
sys.exit(int(sys.argv[3]))
"""


def node(tmp_path, refusals: int, code: int = 0, wait_for: Path | None = None) -> list[str]:
    script = tmp_path / "node.py"
    script.write_text(REFUSED_NODE)
    return [sys.executable, str(script), str(tmp_path / "runs"), str(refusals), str(code),
            *([str(wait_for)] if wait_for else [])]


def runs(tmp_path) -> int:
    return int((tmp_path / "runs").read_text())


def test_a_refused_node_is_started_again_until_it_is_let_in(tmp_path, capfd):
    said: list[str] = []
    assert run_retrying(node(tmp_path, 2), retry_for=30, pause=0.05, say=said.append) == 0
    assert runs(tmp_path) == 3
    assert len(said) == 2 and all("refused to activate" in s and "retrying in" in s for s in said)
    out = capfd.readouterr().err  # the node's output is passed through
    assert out.count(REFUSAL) == 2 and "node up" in out


def test_retrying_stops_at_the_bound_with_a_clear_message(tmp_path):
    said: list[str] = []
    # A clock that follows the attempts, not the machine's load: 10 s pass with each attempt, so
    # --retry-for 25 is over after the third, however long the attempts really took.
    clock = lambda: 10.0 * (runs(tmp_path) if (tmp_path / "runs").exists() else 0)  # noqa: E731
    code = run_retrying(node(tmp_path, 10_000), retry_for=25, pause=0.01, say=said.append,
                        clock=clock)
    assert code == 1 and runs(tmp_path) == 3
    assert "giving up" in said[-1] and "after 25s (3 attempts)" in said[-1] and "--retry-for" in (
        said[-1])
    assert [s.split("(attempt ")[1][0] for s in said[:-1]] == ["1", "2"]
    assert all("retrying in" in s for s in said[:-1])


def test_other_exits_are_not_retried(tmp_path):
    said: list[str] = []
    # an exit without the refusal (e.g. a bad flag) ends at once with its code, and says so
    assert run_retrying(node(tmp_path, 0, code=3), retry_for=30, pause=0.05, say=said.append) == 3
    assert runs(tmp_path) == 1
    [report] = said
    assert "flower-supernode (PID " in report and "exited with code 3" in report
    assert report.endswith("Its last lines of output:\n    node up"), report


def test_a_refusal_is_not_retried_without_retry_for(tmp_path):
    said: list[str] = []
    assert run_retrying(node(tmp_path, 5), retry_for=0, pause=0.05, say=said.append) == 1
    assert runs(tmp_path) == 1
    [report] = said  # the node's exit, with what to do about a refusal
    assert "exited with code 1" in report and REFUSAL in report
    assert "its key is not registered (`flwr supernode register`)" in report


def test_supernode_command_takes_retry_for():
    from fedmaml.cli import main

    assert main(["deploy", "supernode", "--superlink", "127.0.0.1:9092", "--insecure",
                 "--partition-id", "0", "--retry-for", "30", "--dry-run"]) == 0


def test_the_command_beside_runs_next_to_every_attempt_and_stops_with_it(tmp_path):
    # stands in for the warm ClientApp executor: notes its start, then would run for ever
    helper = tmp_path / "helper.py"
    helper.write_text("import os, sys, time\n"
                      "with open(sys.argv[1], 'a') as f: f.write(f'{os.getpid()}\\n')\n"
                      "time.sleep(600)\n")
    started = tmp_path / "started"
    # each attempt of the node waits until its helper has noted itself
    code = run_retrying(node(tmp_path, 2, wait_for=started), retry_for=600, pause=0.05,
                        say=lambda _: None,
                        beside=[sys.executable, str(helper), str(started)])
    assert code == 0
    pids = [int(p) for p in started.read_text().split()]
    assert len(pids) == 3  # one per attempt
    assert not any(alive(p) for p in pids)  # each stopped when its attempt ended


def test_a_run_that_stays_the_same_is_polled_less_and_less_often():
    from fedmaml.deploy.runs import MAX_POLL_SECONDS, next_poll

    waits, wait = [], 3.0
    for changed in [True, False, False, False, False, False, False, True, False]:
        wait = next_poll(wait, changed, 3.0)
        waits.append(wait)
    assert waits[:4] == [3.0, 4.5, 6.75, 10.125] and waits[5] == waits[6] == MAX_POLL_SECONDS
    assert waits[7:] == [3.0, 4.5]  # a change: back to the first wait
    assert next_poll(30.0, False, 30.0) == 30.0  # a longer first wait is kept


def _poll_times(monkeypatch, ends_at: float, sign_at: float | None) -> list[float]:
    """When wait_for_run polls the status of a run that is running until ``ends_at`` (clock
    seconds), with a local sign of its end that appears at ``sign_at`` (None: no sign)."""
    from fedmaml.deploy import runs

    clock, polls = SimulatedClock(), []

    def status(run_id, connection=None, *, home=None):
        polls.append(clock.now)
        return {"status": "finished:completed" if clock.now >= ends_at else "running"}

    monkeypatch.setattr(runs, "time", clock)
    monkeypatch.setattr(runs, "run_status", status)
    sign = None if sign_at is None else (lambda: clock.now >= sign_at)
    assert runs.wait_for_run(1, sign=sign)["status"] == "finished:completed"
    return polls


def test_a_local_sign_of_the_end_has_the_status_polled_again_soon(monkeypatch):
    from fedmaml.deploy.runs import SIGN_POLL_SECONDS, SIGNED_POLL_SECONDS

    # Without a sign the end (at 40 s) is seen only at the next of the ever longer waits...
    without = _poll_times(monkeypatch, ends_at=40.0, sign_at=None)
    assert without[-1] > 45.0, without
    # ... with one (summary.json, written 3 s before the ServerApp exits), soon after it: the
    # waits start again from SIGNED_POLL_SECONDS at the sign (seen within SIGN_POLL_SECONDS):
    # polls about 1, 2.5 and 4.75 s after it
    polls = _poll_times(monkeypatch, ends_at=40.0, sign_at=37.0)
    seen = next(i for i, t in enumerate(polls) if t >= 37.0)
    assert polls[seen] <= 37.0 + SIGN_POLL_SECONDS + 1e-9, polls
    assert polls[seen + 1] - polls[seen] == pytest.approx(SIGNED_POLL_SECONDS), polls
    assert 40.0 <= polls[-1] <= polls[seen] + 4.75 + 1e-9, polls
    assert len(polls) <= len(without) + 4  # not many more status calls (each starts `flwr ls`)
    # A ServerApp that lingers after its summary (a tracker's upload) is not polled every second:
    # the waits grow again, each status call being a `flwr ls` process.
    lingering = _poll_times(monkeypatch, ends_at=300.0, sign_at=37.0)
    assert len([t for t in lingering if t > 37.0]) < 30, lingering
