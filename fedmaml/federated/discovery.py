"""Which node serves which client id, when nodes join late, restart or vanish (real deployments).

The strategy addresses clients by their stable id (``partition-id`` in a node's config); Flower
addresses nodes by transport node ids. Our own engines know the mapping (``grid.partition_nodes()``);
on Flower's simulation and on a real federation the server asks each node its ``partition-id`` with a
``query`` message.

On devices the mapping changes during a run: a SuperNode may connect after the run started, and one
that restarts without node authentication comes back under a new node id (with authentication the id
is tied to its registered key and stays the same). :class:`PartitionDirectory` therefore asks every
node it has not heard from yet at every refresh, without blocking the round: queries are pushed and
their replies collected at the next refresh, so a silent node never holds up training. When two nodes
claim the same client id, the later reply wins (the restarted node).
"""

from __future__ import annotations

import logging
import os
import time

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedmaml.errors import MessageError
from fedmaml.federated import records as R

log = logging.getLogger("fedmaml")

QUERY = "query"
QUERY_TTL = 600.0  # seconds a query waits at the SuperLink for a node that is offline
POLL_SECONDS = 0.5
#: seconds a simulation's nodes get to register before too few of them is an error (Flower's
#: simulation registers all of its nodes at start; the grace covers those still connecting)
NODE_GRACE_SECONDS = 5.0


class PartitionDirectory:
    """Client id -> node id for one run on ``grid``; :meth:`refresh` before each round."""

    def __init__(self, grid: Grid, expected: int) -> None:
        self.grid = grid
        self.expected = expected  # client ids 0 .. expected-1 (training and unseen clients)
        self.nodes: dict[int, int] = {}  # client id -> node id
        self._asked: set[int] = set()  # node ids with a query pending or answered
        self._pending: dict[str, int] = {}  # query message id -> node id

    @property
    def missing(self) -> list[int]:
        return sorted(set(range(self.expected)) - set(self.nodes))

    def refresh(self) -> dict[int, int]:
        """Collect the answers that arrived and ask the nodes that appeared; never waits."""
        known = getattr(self.grid, "partition_nodes", None)
        if callable(known):  # our engines know the mapping, and it never changes: no queries
            if not self.nodes:
                self.nodes = dict(known())
            return self.nodes
        self._collect()
        self._ask(sorted(set(self.grid.get_node_ids()) - self._asked))
        return self.nodes

    def discover(self, limit: float, simulation: bool = False) -> dict[int, int]:
        """Wait up to ``limit`` seconds for a node for every client id.

        In a deployment, clients still missing then are logged and treated as failed when sampled
        (their node may connect later); no node at all is an error. In a simulation the engine
        started one node per client id, so any missing node is an error (its actors did not start
        or answer in time)."""
        start = time.monotonic()
        deadline = start + limit
        self.refresh()
        while self.missing and time.monotonic() < deadline:
            if simulation and time.monotonic() - start >= min(NODE_GRACE_SECONDS, limit):
                self._check_enough_nodes()
            time.sleep(POLL_SECONDS)
            self.refresh()
        missing = self.missing
        if missing and simulation:
            self._check_enough_nodes()
            load = _load_average()
            raise MessageError(
                f"{len(missing)} of the {self.expected} simulated nodes (one per client id, in "
                f"Ray actors) did not answer within {limit:.0f}s{load}: the actors are slow to "
                "start on a loaded machine; raise engine.discovery_timeout (seconds), lower "
                "engine.num_cpus to run more actors, or use engine.name: inprocess or vectorized")
        if missing and not self.nodes:
            raise MessageError(f"no node answered within {limit:.0f}s ({self.expected} client ids "
                               "expected); start one SuperNode per client id with --node-config "
                               "'partition-id=<id>' and check that they reach the SuperLink")
        if missing:
            connected = len(set(self.grid.get_node_ids()))
            fewer = (f"; only {connected} SuperNodes are connected for {self.expected} client ids: "
                     "start more SuperNodes, or lower data.num_clients"
                     if connected < self.expected else "")
            log.warning("no node serves client ids %s (%d of %d found); they count as failed when "
                        "sampled until a SuperNode with that partition-id connects%s",
                        _ids(missing), len(self.nodes), self.expected, fewer)
        return self.nodes

    def _check_enough_nodes(self) -> None:
        """Fewer simulated nodes than client ids: no wait makes up for it (one node per id)."""
        connected = len(set(self.grid.get_node_ids()))
        if connected < self.expected:
            raise MessageError(
                f"the simulation federation has {connected} nodes for {self.expected} client ids "
                "(data.num_clients plus data.unseen_clients; one node per client id): give it "
                f"{self.expected} SuperNodes (flwr federation simulation-config <federation> "
                f"<connection> --num-supernodes {self.expected}; see docs/deployment.md), or lower "
                f"data.num_clients so that the client ids fit {connected} nodes")

    def _ask(self, node_ids: list[int]) -> None:
        if not node_ids:
            return
        messages = [Message(RecordDict(), nid, QUERY, ttl=QUERY_TTL, group_id="discovery")
                    for nid in node_ids]
        for nid, mid in zip(node_ids, self.grid.push_messages(messages)):
            if mid:  # None: the SuperLink refused it; the node is asked again next time
                self._pending[mid] = nid
                self._asked.add(nid)

    def _collect(self) -> None:
        if not self._pending:
            return
        for reply in self.grid.pull_messages(list(self._pending)):
            nid = self._pending.pop(reply.metadata.reply_to_message_id, None)
            if nid is None:
                continue
            if reply.has_error():  # offline or gone: ask again if it shows up later
                self._asked.discard(nid)
                continue
            try:
                cid = int(reply.content[R.METRICS][R.PARTITION])
            except (KeyError, TypeError, ValueError):
                log.warning("node %d answered the partition query without a valid %s", nid,
                            R.PARTITION)
                continue
            if not 0 <= cid < self.expected:
                log.warning("node %d serves client id %d, outside this run's 0..%d; ignored", nid,
                            cid, self.expected - 1)
                continue
            old = self.nodes.get(cid)
            if old is not None and old != nid:
                log.warning("client %d moved from node %d to node %d (a restarted SuperNode)", cid,
                            old, nid)
            self.nodes[cid] = nid


def _load_average() -> str:
    try:
        return f" (load average {os.getloadavg()[0]:.1f})"
    except OSError:  # not available on every platform
        return ""


def _ids(ids: list[int]) -> str:
    return str(ids[:10])[:-1] + (", ...]" if len(ids) > 10 else "]")
