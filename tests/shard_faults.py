"""A task loss that lets a test stop a shard actor in the middle of a chosen round
(``model.loss: shard_faults:mse_or_hold``; tests/test_sharded.py).

It is MSE, except that while the file named by ``$FEDMAML_TEST_SHARD_HOLD`` exists and says
``<round> <shard>`` (or ``<round> node:<Ray node id>``), the actor of that shard (or the one on that
node), training that round, takes the file (once), writes ``<file>.pid`` with its process id and
waits there: the test then kills it (``kill -9``) or removes its node, and the actor dies in the
middle of its round, as a crash would kill it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fedmaml.core.losses import mse
from fedmaml.engines import shards

HOLD_ENV = "FEDMAML_TEST_SHARD_HOLD"
HOLD_SECONDS = 300.0  # a test that never kills it fails rather than hangs


def mse_or_hold(pred, target):
    path = os.environ.get(HOLD_ENV)
    here = shards.working_on
    if path and here.get("kind") == "train" and os.path.exists(path):
        try:
            round_, who = Path(path).read_text().split()
        except (OSError, ValueError):
            round_, who = "-1", ""
        if here.get("round") == int(round_) and who in (str(here.get("shard")), _node()):
            try:
                os.rename(path, f"{path}.taken")  # once: the first call of that round
            except OSError:
                return mse(pred, target)
            Path(f"{path}.pid.tmp").write_text(str(os.getpid()))
            os.rename(f"{path}.pid.tmp", f"{path}.pid")
            deadline = time.monotonic() + HOLD_SECONDS
            while time.monotonic() < deadline:
                time.sleep(0.05)
            raise RuntimeError("shard_faults: held for a kill that never came")
    return mse(pred, target)


def _node() -> str:
    import ray

    return f"node:{ray.get_runtime_context().get_node_id()}"
