"""The in-process engine: a Flower ``Grid`` that calls the ``ClientApp`` directly.

No Ray, no SuperLink, no polling: ``send_and_receive`` runs each message through the ClientApp in
this process, with one persistent ``Context`` per node (created on first contact, so a federation of
a million clients costs nothing until they are sampled). A ClientApp exception becomes an error
reply, as in Flower's simulation engine; a reply that took longer than the timeout is dropped, as if
it had arrived too late. Clients run one after another here but stand for devices working in
parallel, so the timeout applies to each client's own time, not to the sum (the client's work, e.g.
its memory update, still happened, as on a real device whose reply is lost). Node ids are
``client id + 2``; ``partition_nodes`` spares the discovery round.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from flwr.supercore.task_identity import TaskIdentity

from fedmaml.federated import records as R

CLIENT_APP_ERROR = 2  # Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION
SERVER_NODE_ID = 1  # Flower's SUPERLINK_NODE_ID; client nodes are numbered from 2
FIRST_CLIENT_NODE = 2


class InProcessGrid(Grid):
    #: replies come back from ``send_and_receive`` itself: nothing to poll (federated.strategy.exchange)
    synchronous = True

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        self.client_app, self.num_nodes, self._run_id = client_app, num_nodes, 1
        self.contexts: dict[int, Context] = {}

    # -- node bookkeeping -----------------------------------------------------------------------
    def partition_nodes(self) -> dict[int, int]:
        return {cid: cid + FIRST_CLIENT_NODE for cid in range(self.num_nodes)}

    def context(self, node_id: int) -> Context:
        ctx = self.contexts.get(node_id)
        if ctx is None:
            ctx = self.contexts[node_id] = Context(
                run_id=self._run_id, node_id=node_id, state=RecordDict(),
                node_config={R.PARTITION: node_id - FIRST_CLIENT_NODE, "num-partitions": self.num_nodes},
                run_config={})
        return ctx

    # -- Grid API -------------------------------------------------------------------------------
    def set_run(self, run: Any) -> None:
        self._run_id = getattr(run, "run_id", self._run_id)

    @property
    def run(self) -> Any:
        return None

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return range(FIRST_CLIENT_NODE, self.num_nodes + FIRST_CLIENT_NODE)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("the in-process grid only supports send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("the in-process grid only supports send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            start = time.perf_counter()
            try:
                reply = self.client_app(msg, self.context(msg.metadata.dst_node_id))
            except Exception as e:  # noqa: BLE001 - reported to the strategy as an error reply
                reply = error_reply(msg, e)
            if timeout is not None and time.perf_counter() - start > timeout:
                continue  # arrived too late for this round
            replies.append(reply)
        return replies


def error_reply(msg: Message, e: Exception) -> Message:
    """The reply to ``msg`` of a client that raised ``e``, as Flower's simulation engine makes it."""
    return Message(Error(code=CLIENT_APP_ERROR, reason=f"{type(e).__name__}: {e}"), reply_to=msg)


def claim_task_identity() -> None:
    """Messages take their run and sender ids from the process's task identity, which Flower's own
    runtimes set before they start a ServerApp; so do we (node 1 is the SuperLink's id)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SERVER_NODE_ID


def run_inprocess(server_app: ServerApp, client_app: ClientApp, num_nodes: int,
                  grid: InProcessGrid | None = None) -> InProcessGrid:
    """Run ``server_app`` against ``client_app`` on ``num_nodes`` in-process nodes; returns the grid
    (its ``contexts`` hold each node's state). ``grid`` may be a prepared (e.g. instrumented) one."""
    claim_task_identity()
    grid = grid if grid is not None else InProcessGrid(client_app, num_nodes)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                             run_config={}))
    return grid
