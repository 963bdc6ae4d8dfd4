"""``fedmaml deploy supernode`` watches its two processes (fedmaml/deploy/supervisor.py): when
``flower-supernode`` exits, at start or later, the ClientApp launcher beside it is stopped and the
command exits non-zero at once, naming what died, its exit status and its last lines; when the
launcher dies, the node is stopped. Waits in tests end as soon as the process they wait on has
exited (``processes.wait_until(..., process=...)``), with the same facts.

Small Python programs stand in for ``flower-supernode`` and the launcher in the fast tests; the
last test starts the real command, with a real ``flower-supernode``, on a port that is taken.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fedmaml.deploy import processes
from fedmaml.deploy.commands import program_env
from fedmaml.deploy.retry import run_retrying

REPO = Path(__file__).resolve().parents[1]

# Notes its PID in argv[1], then waits for the file argv[2] to exist (an event), then exits with
# code argv[3] ("stay": runs until it is stopped).
STAND_IN = """
import os, sys, time
from pathlib import Path
Path(sys.argv[1]).write_text(str(os.getpid()))
print("up", flush=True)
give_up = time.monotonic() + 120
while not Path(sys.argv[2]).exists():
    assert time.monotonic() < give_up, "the event never came"
    time.sleep(0.01)
if sys.argv[3] == "stay":
    time.sleep(600)
print("going down", flush=True)
sys.exit(int(sys.argv[3]))
"""


def stand_in(tmp_path: Path, name: str, after: str, code: str) -> list[str]:
    """A stand-in that notes its PID in ``name.pid`` and exits with ``code`` once ``after`` (a
    file in tmp_path) exists."""
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    return [sys.executable, str(script), str(tmp_path / f"{name}.pid"), str(tmp_path / after),
            code]


def pid_of(tmp_path: Path, name: str) -> int:
    return int((tmp_path / f"{name}.pid").read_text())


@pytest.fixture(autouse=True)
def no_stand_in_left(tmp_path):
    """Whatever a test's outcome, the stand-ins it started are gone after it (by their PIDs)."""
    yield
    for pid_file in tmp_path.glob("*.pid"):
        pid = int(pid_file.read_text())
        if processes.alive(pid) and "stand_in.py" in processes.command_of(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_node_that_exits_stops_its_launcher_and_says_what_died(tmp_path):
    said: list[str] = []
    # the node exits with 3 once the launcher is up (its PID file is the event)
    code = run_retrying(stand_in(tmp_path, "node", "launcher.pid", "3"), retry_for=600,
                        say=said.append, beside=stand_in(tmp_path, "launcher", "never", "stay"))
    assert code == 3
    launcher = pid_of(tmp_path, "launcher")
    assert not processes.alive(launcher)
    [report] = said
    assert f"flower-supernode (PID {pid_of(tmp_path, 'node')}) exited with code 3" in report
    assert f"stopped the ClientApp launcher (PID {launcher})" in report
    assert report.endswith("Its last lines of output:\n    up\n    going down"), report


def test_a_launcher_that_exits_stops_its_node(tmp_path):
    said: list[str] = []
    # the launcher exits with 4 once the node is up; the node would run until stopped
    code = run_retrying(stand_in(tmp_path, "node", "never", "stay"), retry_for=600,
                        say=said.append, beside=stand_in(tmp_path, "launcher", "node.pid", "4"))
    assert code == 4
    node = pid_of(tmp_path, "node")
    assert not processes.alive(node)
    [report] = said
    assert f"the ClientApp launcher (PID {pid_of(tmp_path, 'launcher')}) exited with code 4" in (
        report)
    assert f"flower-supernode (PID {node}) was stopped too" in report


def test_a_stop_request_stops_both_and_reports_nothing(tmp_path):
    said: list[str] = []

    def stop_when_both_are_up() -> None:  # as Ctrl-C or a service manager would, once they run
        processes.wait_until(lambda: (tmp_path / "node.pid").exists()
                             and (tmp_path / "launcher.pid").exists(), 120, "both stand-ins",
                             interval=0.01)
        # only while run_retrying's handler is in place: after it returned (a stand-in failed),
        # a SIGTERM would end this test process instead of failing the test
        if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
            os.kill(os.getpid(), signal.SIGTERM)

    stopper = threading.Thread(target=stop_when_both_are_up)
    stopper.start()
    code = run_retrying(stand_in(tmp_path, "node", "never", "stay"), retry_for=600,
                        say=said.append, beside=stand_in(tmp_path, "launcher", "never", "stay"))
    stopper.join()
    assert code == 128 + signal.SIGTERM and said == []
    assert not any(processes.alive(pid_of(tmp_path, n)) for n in ("node", "launcher"))


def test_a_wait_on_a_process_ends_when_it_exits_naming_it(tmp_path):
    log = tmp_path / "node.log"
    proc = processes.start([sys.executable, "-c", "import sys; print('\\x1b[91mERROR\\x1b[0m : "
                            "port taken', flush=True); sys.exit(7)"], log)
    try:
        # ProcessExited, not TimeoutError: the wait did not run out its timeout
        with pytest.raises(processes.ProcessExited) as e:
            processes.wait_until(lambda: "SuperNode ID" in log.read_text(), 120, "node 0 to connect",
                                 process=proc, name="node 0", log=log)
    finally:
        processes.stop(proc)
    assert str(e.value) == (f"node 0 (PID {proc.pid}) exited with code 7; the last lines of its "
                            f"log {log}:\n    ERROR : port taken\n(while waiting for node 0 to "
                            "connect)")


def test_a_wait_whose_condition_came_true_before_the_process_exited_succeeds(tmp_path):
    log = tmp_path / "node.log"
    proc = processes.start([sys.executable, "-c", "print('SuperNode ID: 5')"], log)
    proc.wait(60)
    assert processes.wait_until(lambda: "SuperNode ID" in log.read_text(), 120, "node",
                                process=proc, log=log)


def test_last_lines_keep_the_error_before_a_traceback():
    lines = ["\x1b[92mINFO \x1b[0m: starting", "ERROR: address already in use", "",
             "Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
             "    f()", "    ^^^", "RuntimeError: failed to start"]
    assert processes.last_lines(lines, 4) == [
        "INFO : starting", "ERROR: address already in use", "Traceback (most recent call last):",
        "RuntimeError: failed to start"]
    assert processes.last_lines(lines, 2) == ["Traceback (most recent call last):",
                                              "RuntimeError: failed to start"]


def _runtime_api_users(port: int) -> list[int]:
    """PIDs of the processes started for a node's Runtime API on ``port`` (the launcher)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True,
                         text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines()
            if f"--runtime-api-address 127.0.0.1:{port} " in line + " "]


@pytest.mark.skipif(os.environ.get("FEDMAML_SKIP_DEPLOYMENT") == "1",
                    reason="FEDMAML_SKIP_DEPLOYMENT=1")
@pytest.mark.deployment
@pytest.mark.parametrize("retry", [[], ["--retry-for", "0"]], ids=["default", "retry-for-0"])
def test_a_supernode_whose_port_is_taken_fails_at_once_naming_the_cause(tmp_path, retry):
    """The node's --port is taken (a listening socket of this test): flower-supernode cannot bind
    its Runtime API and exits. No SuperLink is needed: the node binds before it connects."""
    env = {**program_env(), "PYTHONPATH": str(REPO), "FLWR_LOG_LEVEL": "INFO",
           "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "node.log"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", processes.free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        proc = processes.start(
            [sys.executable, "-m", "fedmaml", "deploy", "supernode", "--superlink",
             f"127.0.0.1:{processes.free_port()}", "--insecure", "--partition-id", "0", "--port",
             str(port), "--home", str(tmp_path / "home"), *retry], log, env=env, cwd=tmp_path)
        try:
            # What a test that starts a node waits for: it ends when the command exits.
            with pytest.raises(processes.ProcessExited) as waited:
                processes.wait_until(lambda: "SuperNode ID" in log.read_text(errors="replace"),
                                     180, "the node to connect", process=proc, name="node 0",
                                     log=log)
            code = proc.wait(120)  # a generous bound: it has exited already
        finally:
            processes.stop(proc)
    assert code == 1
    text = log.read_text(errors="replace")
    report = text[text.index("fedmaml: flower-supernode (PID "):]
    assert "exited with code 1" in report and "address already in use" in report, report
    assert "already listens on this node's --port" in report, report
    launcher = int(report.split("stopped the ClientApp launcher (PID ")[1].split(")")[0])
    assert not processes.alive(launcher) and _runtime_api_users(port) == []
    # the test's wait names the node, its exit and the command's report among the last lines
    assert f"node 0 (PID {proc.pid}) exited with code 1" in str(waited.value)
    assert "already listens on this node's --port" in str(waited.value)
