"""Runs on the Ray engine leave no Ray process behind: after a normal end, after SIGINT, and after
``kill -9`` of the driver (then the next run cleans what the killed one left, from its record).

Every test starts real ``python -m fedmaml run`` drivers with their own state directory
(``FEDMAML_STATE_DIR``) and identifies Ray processes by the recorded session only, so Ray clusters
of other users or other tests on this host are never looked at, let alone touched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY
from fedmaml.engines import ray_session
from fedmaml.engines.ray_session import SessionRecord

pytestmark = [pytest.mark.ray, pytest.mark.slow]

#: Generous: starting Ray takes 5-10 s on a quiet machine, much longer on a loaded one.
DEADLINE = 240.0


def start_driver(tmp_path: Path, state: Path, name: str, rounds: int) -> subprocess.Popen:
    env = {**os.environ, ray_session.STATE_ENV: str(state),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    config = tmp_path / f"{name}.yaml"
    config.write_text(f"name: {name}\n")
    argv = [sys.executable, "-m", "fedmaml", "run", "--quiet", str(config), *TINY, f"name={name}",
            f"federated.rounds={rounds}", "federated.eval_every=0", "engine.name=ray",
            f"output_dir={tmp_path / 'runs'}"]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # a terminal's Ctrl-C would not reach it


def wait_for(condition, what: str, proc: subprocess.Popen | None = None):
    """Poll ``condition()`` until it returns something true; fail after DEADLINE or when ``proc``
    ended first."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the driver exited ({proc.returncode}) before {what}:\n{err.decode()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def the_record(state: Path, proc: subprocess.Popen) -> SessionRecord:
    """The driver's session record, once it lists processes."""
    path = state / "ray" / f"{proc.pid}-{ray_session.start_time(proc.pid)}.json"

    def ready():
        try:
            rec = SessionRecord.load(path)
        except (OSError, ValueError):
            return None
        return rec if rec.processes else None

    return wait_for(ready, "the Ray session record", proc)


def trained(tmp_path: Path, name: str, proc: subprocess.Popen) -> None:
    """Wait until round 1 was recorded: actors exist and have worked."""
    metrics = tmp_path / "runs" / name / "metrics.jsonl"

    def done():
        try:
            return any(json.loads(line)["round"] >= 1
                       for line in metrics.read_text().splitlines() if line.strip())
        except (OSError, ValueError):
            return False

    wait_for(done, "round 1", proc)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the driver did not exit:\n{err.decode()[-3000:]}")
    return proc.returncode, err.decode()


def assert_no_process_left(rec: SessionRecord) -> None:
    left = rec.members()
    for pid in left:  # do not leak them into the next test, then fail
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of Ray session {rec.session_dir} still alive: {left}"


def test_sigint_leaves_no_ray_process(tmp_path):
    state = tmp_path / "state"
    proc = start_driver(tmp_path, state, "sigint", rounds=100_000)
    rec = the_record(state, proc)
    trained(tmp_path, "sigint", proc)
    proc.send_signal(signal.SIGINT)  # stops after the round, with a checkpoint
    code, err = finish(proc)
    assert code == 130, err[-3000:]
    assert_no_process_left(rec)
    assert not list((state / "ray").glob("*.json"))


def test_the_next_run_cleans_what_a_killed_driver_left_and_its_normal_end_leaves_nothing(
        tmp_path):
    # One test for both (each Ray start costs 10-20 s): the next run is the normal end.
    state = tmp_path / "state"
    proc = start_driver(tmp_path, state, "killed", rounds=100_000)
    rec = the_record(state, proc)
    trained(tmp_path, "killed", proc)
    proc.kill()  # kill -9: the driver cannot clean anything up
    proc.communicate()
    # Measured: Ray's DashboardAgent and RuntimeEnvAgent outlive a killed driver by about 60 s.
    print(f"left by the killed driver: {rec.members()}")
    assert rec.path.exists()  # only the next run removes it, once the session's processes are gone

    nxt = start_driver(tmp_path, state, "next", rounds=2)
    own = the_record(state, nxt)  # its own session, recorded while it runs
    recorded = {pid for pid, *_ in own.processes}
    assert own.session_dir and own.driver_pid == nxt.pid and recorded
    assert own.session_dir != rec.session_dir
    code, err = finish(nxt)
    assert code == 0, err[-3000:]
    assert not rec.path.exists()
    assert_no_process_left(rec)
    assert_no_process_left(own)  # at the driver's exit, not some time later
    assert not list((state / "ray").glob("*.json"))  # its record went with its session


def test_a_record_of_a_live_driver_or_a_reused_pid_is_left_alone(tmp_path, monkeypatch):
    """No Ray here: a record whose driver is alive (this process) is kept with its processes; a
    record naming a live process with another start time (a reused pid) kills nothing."""
    monkeypatch.setenv(ray_session.STATE_ENV, str(tmp_path / "state"))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        start = ray_session.start_time(sleeper.pid)
        mine = SessionRecord(str(tmp_path / "session_a"), os.getpid(),
                             ray_session.start_time(os.getpid()))
        mine.save()
        mine.processes = [[sleeper.pid, start, "sleeper"]]  # as if recorded
        mine.path.write_text(json.dumps({"session_dir": mine.session_dir,
                                         "driver_pid": mine.driver_pid,
                                         "driver_start": mine.driver_start,
                                         "processes": mine.processes}))
        reused = SessionRecord(str(tmp_path / "session_b"), 1, -1)  # pid 1 started at another time
        reused.path = ray_session.records_dir() / "1--1.json"
        reused.path.write_text(json.dumps({"session_dir": reused.session_dir, "driver_pid": 1,
                                           "driver_start": -1,
                                           "processes": [[sleeper.pid, start - 1, "reused"]]}))
        assert ray_session.clean_leftovers() == []
        assert sleeper.poll() is None
        assert mine.path.exists() and not reused.path.exists()
        # once its driver is dead (as recorded), the same record's process is stopped
        mine.path.write_text(mine.path.read_text().replace(f'"driver_start": {mine.driver_start}',
                                                          '"driver_start": -1'))
        assert ray_session.clean_leftovers() == [sleeper.pid]
        assert sleeper.wait(timeout=DEADLINE) == -signal.SIGKILL
        assert not mine.path.exists()
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
