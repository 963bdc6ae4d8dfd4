"""Checkpoints of a run and its exact resume.

``<run dir>/checkpoint.pt`` (written atomically: temp file, fsync, rename) holds everything the rest
of the run depends on, so that a run interrupted after round ``r`` and resumed ends bitwise equal to
one that never stopped:

* the server: ``w`` (and the model before its last update), the server optimizer's state and step
  count, the clients that have trained, the pattern selector's choice, the running totals, the run's
  health counters (fedmaml/federated/health.py);
* every client memory: the vectorized engine's memory bank as a whole; on the other engines each
  client's memory, fetched with a ``query.memory`` message (:func:`memory_query_reply`), in the
  checkpoint file of the simulation's run directory. A client whose memory is a file on its device
  (``memory-dir``) answers with a reference instead (file name and SHA-256), so a device's memory
  never leaves the device; on resume the device's file must still match it;
* the round and the ``metrics.jsonl`` lines written so far (a resumed run rewrites the file to them,
  dropping rows of a round that a kill cut short);
* the config the run was made from (every key, and its SHA-256): ``fedmaml run --resume`` refuses
  to continue with another one, but for the keys a resume may change (fedmaml/run_dir.py);
* the random state. fedmaml draws every random choice from counter-based streams of the seed, the
  round and the client (client sampling, data, injected faults, the evaluation panel), so a run has
  almost no RNG state; the global ``random``, NumPy and torch generators of the server process are
  saved and restored all the same.

A checkpoint is written every ``federated.checkpoint_every`` rounds and when a stop is requested:
the first SIGINT (Ctrl-C) or SIGTERM during a run (:func:`stop_on_signals`) lets the current round
finish, writes the checkpoint and ends the run with status ``interrupted``; a second one aborts at
once. ``fedmaml run --resume RUN_DIR`` continues from it. A run that ends (completed, diverged or
failed) deletes its checkpoint: its summary.json says what it became.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedmaml.atomic import PRIVATE, atomic_torch_save
from fedmaml.client.store import MemoryStore
from fedmaml.config import Config, config_to_flat
from fedmaml.core.params import Params
from fedmaml.errors import DataError, FedmamlError, MessageError
from fedmaml.federated import codec
from fedmaml.federated.bank_state import bank_state
from fedmaml.federated import records as R
from fedmaml.federated.memory_store import FileStore, digest
from fedmaml.results.run_files import CHECKPOINT_FILE

FORMAT = "fedmaml-checkpoint-1"
MEMORY_QUERY = "query.memory"  # the ClientApp's @app.query("memory")
OP, GET, SET, SEND = "op", "get", "set", "send-memory"
HAS_MEMORY, FILE, SHA256 = "has-memory", "file", "sha256"

# -- stopping --------------------------------------------------------------------------------------

_STOP = threading.Event()
_BLOCKS = [0]  # stop_on_signals blocks open in this process (a block inside another shares it)


def request_stop() -> None:
    """Ask the running run to stop after its current round (with a checkpoint)."""
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """During the block, the first SIGINT/SIGTERM requests a stop after the current round; a second
    one raises KeyboardInterrupt at once. Outside the main thread (signals cannot be caught there)
    only :func:`request_stop` stops a run. A block inside another (``fedmaml.run`` around a run's
    own) is the outer one's: a stop asked for in it is still :func:`stop_requested` when it ends,
    for the outer block to see."""
    if _BLOCKS[0]:
        yield
        return

    def handle(signum: int, frame: Any) -> None:
        if _STOP.is_set():
            raise KeyboardInterrupt
        _STOP.set()
        print(f"\n{signal.Signals(signum).name}: stopping after this round with a checkpoint "
              "(send it again to abort at once)", file=sys.stderr, flush=True)

    _STOP.clear()
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    _BLOCKS[0] += 1
    try:
        yield
    finally:
        _BLOCKS[0] -= 1
        for s, h in previous.items():
            signal.signal(s, h)
        _STOP.clear()


# -- client side: the memory query -----------------------------------------------------------------

def memory_query_reply(msg: Message, store: MemoryStore, cid: int, like: Params) -> Message:
    """Answer a ``query.memory`` message. ``get`` returns the client's memory when the server asks
    for it (``send-memory``, only in simulation), else a reference: the file and its SHA-256 for
    a memory file on a device, the SHA-256 of the memory for one in ``Context.state``. ``set``
    replaces the memory by the one sent, or checks that the memory still matches the reference."""
    config = msg.content[R.CONFIG]
    op = str(config[OP])
    metrics: dict[str, Any] = {R.PARTITION: cid}
    content: dict[str, Any] = {}
    if op == GET:
        memory = store.load()
        metrics[HAS_MEMORY] = int(memory is not None)
        if memory is not None and (isinstance(store, FileStore) or not int(config.get(SEND, 0))):
            content[R.CONFIG] = ConfigRecord({FILE: str(getattr(store, "path", "")),
                                              SHA256: _fingerprint(store, memory)})
        elif memory is not None:
            content[R.ARRAYS] = codec.encode(memory)
    elif op == SET:
        if SHA256 in config:  # a reference: the memory never left the device
            want = str(config[SHA256])
            memory = store.load()
            have = "none" if memory is None else _fingerprint(store, memory)
            if have != want:
                where = f"memory file {store.path}" if isinstance(store, FileStore) else \
                    f"the memory of client {cid}"
                raise DataError(f"{where} has sha256 {have}, the checkpoint expects {want}: the "
                                "device's memory moved on (or was lost) since the checkpoint, so "
                                "the run cannot resume exactly")
        else:
            memory = dict(codec.decode(msg.content[R.ARRAYS]))
            if list(memory) != list(like):
                raise MessageError(f"memory of client {cid}: parameters {list(memory)}, expected "
                                   f"{list(like)}")
            store.save(memory)
    else:
        raise MessageError(f"memory query: {OP} {op!r} is not {GET!r} or {SET!r}")
    return Message(RecordDict({R.METRICS: MetricRecord(metrics), **content}), reply_to=msg)


def _fingerprint(store: MemoryStore, memory: Params) -> str:
    """SHA-256 (first 16 hex digits) of a memory file's bytes, or of a memory's encoded arrays."""
    if isinstance(store, FileStore):
        return digest(store.path.read_bytes())
    return digest(b"".join(bytes(a.data) for a in codec.encode(memory).values()))


# -- server side -----------------------------------------------------------------------------------

Send = Callable[[list[Message]], list[Message]]


def collect_memories(grid: Any, nodes: Mapping[int, int], cids: list[int], send: Send,
                     simulated: bool) -> dict[str, Any]:
    """Every client memory of the run: the vectorized engine's bank, or each client's by
    ``query.memory``: its tensors in a simulation, a ``{file, sha256}`` reference otherwise (a
    device's memory never leaves it). Raises FedmamlError when a client does not answer: a
    checkpoint without its memory could not resume exactly."""
    if hasattr(grid, "memory_state"):
        return {"bank": grid.memory_state()}
    asked = [c for c in cids if c in nodes]
    query = ConfigRecord({OP: GET, SEND: int(simulated)})
    messages = [Message(RecordDict({R.CONFIG: query}), nodes[c], MEMORY_QUERY,
                        group_id="checkpoint") for c in asked]
    memories: dict[int, Any] = {}
    for reply in send(messages):
        if reply.has_error():
            continue
        m = reply.content[R.METRICS]
        cid = int(m[R.PARTITION])
        if not int(m[HAS_MEMORY]):
            memories[cid] = None
        elif R.ARRAYS in reply.content:
            memories[cid] = dict(codec.decode(reply.content[R.ARRAYS]))
        else:
            c = reply.content[R.CONFIG]
            memories[cid] = {FILE: str(c[FILE]), SHA256: str(c[SHA256])}
    missing = sorted(set(asked) - set(memories)) + sorted(set(cids) - set(nodes))
    if missing:
        raise FedmamlError(f"client(s) {missing[:10]} did not return their memory")
    return {"clients": {c: v for c, v in memories.items() if v is not None}}


def bank_to_clients(bank: Mapping[str, Any]) -> dict[int, Params]:
    """A memory bank's state (the vectorized engine's, or a vectorized sweep's) as each client's
    memory, the form the other engines' checkpoints hold."""
    ids = bank["client_ids"].tolist()
    return {int(c): {k: v[row].clone() for k, v in bank["memory"].items()}
            for row, c in enumerate(ids)}


def clients_to_bank(clients: Mapping[int, Any], num_clients: int) -> dict[str, Any] | None:
    """Per-client memories (tensors) as a memory bank's state; ``None`` when a memory is a
    reference to a device's file (it never left the device, so no bank can hold it)."""
    if any(FILE in m for m in clients.values()):
        return None
    ids = sorted(clients)
    names = list(clients[ids[0]]) if ids else []
    return bank_state(num_clients, torch.tensor(ids, dtype=torch.int64),
                      {k: torch.stack([clients[c][k] for c in ids]) for k in names})


def restore_memories(grid: Any, nodes: Mapping[int, int], memories: Mapping[str, Any],
                     send: Send) -> None:
    """Give every client its memory back (the inverse of :func:`collect_memories`). A simulation's
    checkpoint resumes on any engine: a memory bank is handed to per-client engines client by
    client, and per-client memories become a bank for the vectorized engine."""
    if hasattr(grid, "load_memory_state"):
        bank = memories.get("bank")
        if bank is None and "clients" in memories:  # ("bank": None: no memories to restore)
            bank = clients_to_bank(memories["clients"], grid.bank.num_clients)
            if bank is None:
                raise FedmamlError("this checkpoint holds references to memory files on devices; "
                                   "the vectorized engine cannot resume it (use the engine the "
                                   "run was started on)")
        grid.load_memory_state(bank)
        return
    clients = (bank_to_clients(memories["bank"]) if "bank" in memories
               else memories["clients"])
    absent = sorted(c for c in clients if c not in nodes)
    if absent:
        raise FedmamlError(f"cannot restore the memories of client(s) {absent[:10]}: no node "
                           "serves them")
    messages = []
    for cid, memory in clients.items():
        if FILE in memory:
            content = RecordDict({R.CONFIG: ConfigRecord({OP: SET, SHA256: memory[SHA256]})})
        else:
            content = RecordDict({R.CONFIG: ConfigRecord({OP: SET}),
                                  R.ARRAYS: codec.encode(memory)})
        messages.append(Message(content, nodes[cid], MEMORY_QUERY, group_id="restore"))
    replies = send(messages)
    errors = [r.error.reason for r in replies if r.has_error()]
    if errors or len(replies) < len(messages):
        raise FedmamlError(f"restoring the clients' memories failed ({len(messages) - len(replies)}"
                           f" did not answer){': ' + errors[0] if errors else ''}")


def rng_state() -> dict[str, Any]:
    """The global generators' states, as plain values and tensors (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"random": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                      float(gauss)),
            "torch": torch.get_rng_state()}


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["random"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


# -- the file --------------------------------------------------------------------------------------

def path_of(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_FILE


def save(run_dir: str | Path, state: dict[str, Any], config: Config) -> None:
    """``state`` and the resolved ``config`` the run was made from: every key (``config``) and the
    SHA-256 of them (``config_sha256``), so that a resume can refuse a changed config and name the
    keys that changed (fedmaml/run_dir.py)."""
    flat = config_to_flat(config)
    # owner-only, whatever the umask: it holds the clients' memories, which are never released
    atomic_torch_save({"format": FORMAT, **state, "config": flat,
                       "config_sha256": config_sha256(flat)}, path_of(run_dir), mode=PRIVATE)


def config_sha256(flat: Mapping[str, Any]) -> str:
    """SHA-256 of a flat config (``config_to_flat``), leaving out ``output_dir``: where the run
    directory was made is not part of the run."""
    kept = {k: v for k, v in flat.items() if k != "output_dir"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def load(run_dir: str | Path) -> dict[str, Any]:
    path = path_of(run_dir)
    if not path.exists():
        raise FedmamlError(f"{Path(run_dir)}: no {CHECKPOINT_FILE} to resume from (the run was "
                           "not interrupted, or stopped before its first checkpoint: see "
                           "federated.checkpoint_every)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        # its messages run to paragraphs about weights_only; the kind and the size say enough
        raise DataError(f"checkpoint {path} is unreadable: truncated, or not written by fedmaml "
                        f"({path.stat().st_size} bytes; torch: {type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(f"{path} is not a fedmaml checkpoint (format {FORMAT})")
    stored = state.get("config_sha256")
    # the config decides what a resume may change (fedmaml/run_dir.py): a stored config that no
    # longer matches its hash (damaged, or edited to slip a change past that check) is refused
    if stored is not None and config_sha256(state.get("config") or {}) != stored:
        raise DataError(f"checkpoint {path}: the config stored in it does not match its "
                        f"config_sha256 (damaged, or edited by hand)")
    return state


def remove(run_dir: str | Path) -> None:
    path_of(run_dir).unlink(missing_ok=True)
