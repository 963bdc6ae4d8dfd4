"""What a SuperNode's ``--node-config`` tells the ClientApp about its device.

=================== =========================================================================
key                 meaning
=================== =========================================================================
``partition-id``    the client id this node serves (required; 0 .. clients + unseen - 1)
``num-partitions``  informational (Flower's convention); fedmaml takes the count from the config
``memory-dir``      keep memories on this device's disk, in ``<memory-dir>/run-<run id>/``
                    (without it they live in the node's RAM and a restart loses them)
``memory-reset``    ``true``: a memory file that is corrupt or of the wrong shape is moved aside
                    and the client starts afresh; otherwise it is an error
``data-path``       this device's copy of the data (``data.path`` for this node only)
=================== =========================================================================

Memories are kept per run: a new run (even of the same config) starts from fresh memories, as it
would in simulation, while a SuperNode that restarts within a run finds its memory where it left it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flwr.app import Context

from fedmaml.client.store import MemoryStore
from fedmaml.config.schema import Config
from fedmaml.core.params import Params
from fedmaml.errors import ConfigError
from fedmaml.federated.memory_store import ContextStateStore, FileStore

PARTITION, MEMORY_DIR, MEMORY_RESET, DATA_PATH = ("partition-id", "memory-dir", "memory-reset",
                                                  "data-path")


def client_id(context: Context) -> int:
    value = context.node_config.get(PARTITION)
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
        raise ConfigError(f"node config {PARTITION} = {value!r}: expected the client id this node "
                          f"serves, an integer >= 0 (--node-config '{PARTITION}=0')")
    return int(value)


def with_node_data(cfg: Config, context: Context) -> Config:
    """``cfg`` with ``data.path`` replaced by this node's ``data-path``, if it has one."""
    path = context.node_config.get(DATA_PATH)
    if not path:
        return cfg
    from fedmaml.config import replace_path

    return replace_path(cfg, "data.path", str(Path(str(path)).expanduser()))


def memory_store(context: Context, client: int, like: Params) -> MemoryStore:
    """A file store under ``memory-dir`` when the node has one, else the node's ``Context.state``."""
    directory = context.node_config.get(MEMORY_DIR)
    if not directory:
        return ContextStateStore(context)
    reset = context.node_config.get(MEMORY_RESET, False)
    if isinstance(reset, str):
        reset = reset.strip().lower() in ("true", "1", "yes")
    run_dir = Path(str(directory)).expanduser() / f"run-{context.run_id}"
    return FileStore(run_dir, client, like=like, reset_corrupt=bool(reset), report=_report)


def _report(line: str) -> None:
    # A ClientApp process's stderr ends up in its SuperNode's log, where a device's operator looks.
    print(f"fedmaml: {line}", file=sys.stderr, flush=True)
