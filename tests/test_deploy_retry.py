"""``fedmaml deploy supernode --retry-for``: a SuperNode the SuperLink refuses is started again,
for a bounded time (fedmaml/deploy/retry.py). A small Python program stands in for
``flower-supernode``: it prints Flower's refusal and exits for its first runs, then succeeds. The
refusal from a real SuperLink is covered by the deployment end-to-end test (an unregistered key)."""

from __future__ import annotations

import sys
import time

from fedmaml.deploy.retry import REFUSAL, run_retrying

REFUSED_NODE = """
import sys
from pathlib import Path
runs = Path(sys.argv[1])
n = int(runs.read_text()) if runs.exists() else 0
runs.write_text(str(n + 1))
if n < int(sys.argv[2]):
    print("ERROR : Failed to activate SuperNode.", flush=True)
    sys.exit(1)
print("node up", flush=True)
sys.exit(int(sys.argv[3]))
"""


def node(tmp_path, refusals: int, code: int = 0) -> list[str]:
    script = tmp_path / "node.py"
    script.write_text(REFUSED_NODE)
    return [sys.executable, str(script), str(tmp_path / "runs"), str(refusals), str(code)]


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
    start = time.monotonic()
    code = run_retrying(node(tmp_path, 10_000), retry_for=0.5, pause=0.1, say=said.append)
    assert code == 1 and time.monotonic() - start < 10
    assert runs(tmp_path) >= 2
    assert "giving up" in said[-1] and "--retry-for" in said[-1]
    assert all("retrying in" in s for s in said[:-1]) and len(said) == runs(tmp_path)


def test_other_exits_are_not_retried(tmp_path):
    said: list[str] = []
    # an exit without the refusal (e.g. a bad flag) ends at once with its code
    assert run_retrying(node(tmp_path, 0, code=3), retry_for=30, pause=0.05, say=said.append) == 3
    assert runs(tmp_path) == 1 and said == []


def test_supernode_command_takes_retry_for():
    from fedmaml.cli import main

    assert main(["deploy", "supernode", "--superlink", "127.0.0.1:9092", "--insecure",
                 "--partition-id", "0", "--retry-for", "30", "--dry-run"]) == 0
