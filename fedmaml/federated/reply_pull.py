"""Pull replies from a SuperLink as they complete, never blocking on one that is still uploading.

Flower 1.41's ``HttpGrid.pull_messages`` (``flwr/superlink/grid/http_grid.py``, the Grid of a
deployed ServerApp) asks the SuperLink for the replies to the given instructions, then downloads
each reply's objects (its arrays, records...) with ``pull_objects``, which retries an object that
is not there yet for up to ``PULL_MAX_TIME`` = 7200 s. A SuperNode announces a reply (its message
and object tree) before it uploads the objects, so a device that dies mid-upload leaves a reply
whose objects never come: the call blocks until the SuperLink drops the node's object-push session
(``OBJECT_PUSH_SESSION_TTL_SECONDS`` = 180 s, ``flwr/supercore/constant.py``). Meanwhile nothing
else is pulled, the round's deadline passes, and the replies the healthy devices had uploaded in
the meantime are never collected (measured: 0 of 3 used, after a 180 s stall).

:class:`ReplyPuller` does the same steps with the same Runtime API calls, but one object at a time
without waiting: a reply whose objects are all there is inflated, confirmed and returned; one that
is still incomplete is kept and tried again at the next poll; one whose objects are gone (the
session expired) becomes the error reply Flower makes for it. So the caller's deadline is the only
clock: replies complete by then count, the incomplete ones count as not arrived.

The SuperLink marks a reply delivered when it lists it (it is not listed twice), so an incomplete
reply is this object's to keep until it completes. It uses ``HttpGrid``'s Runtime API client and
its node and run (private attributes of flwr 1.41, which the project pins); :func:`puller_for`
returns ``None`` for any other Grid, whose own ``pull_messages`` is then used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message


def puller_for(grid: Any) -> "ReplyPuller | None":
    """A :class:`ReplyPuller` for a SuperLink Grid (``HttpGrid``), else ``None``."""
    try:
        from flwr.superlink.grid.http_grid import HttpGrid
    except ImportError:  # another Flower layout: use the Grid's own pull
        return None
    return ReplyPuller(grid) if isinstance(grid, HttpGrid) else None


@dataclass
class _Partial:
    """A reply the SuperLink listed, with the objects downloaded so far."""

    proto: Any  # flwr.proto.message_pb2.Message
    object_ids: list[str]
    contents: dict[str, bytes] = field(default_factory=dict)


class ReplyPuller:
    def __init__(self, grid: Any) -> None:
        self.grid = grid
        self.partial: dict[str, _Partial] = {}  # instruction message id -> its incomplete reply

    def pull(self, message_ids: list[str]) -> list[Message]:
        """The replies to ``message_ids`` that are complete now (and error replies for those whose
        objects were lost); never waits for an object."""
        from flwr.proto.runtime_pb2 import PullAppMessagesRequest
        from flwr.supercore.inflatable.inflatable_object import iterate_object_tree

        client = self.grid._runtime_client  # noqa: SLF001 (flwr 1.41's HttpGrid)
        ask = [m for m in message_ids if m not in self.partial]
        if ask:
            res = client.PullMessages(PullAppMessagesRequest(message_ids=ask))
            for proto, tree in zip(res.messages_list, res.message_object_trees, strict=True):
                key = proto.metadata.reply_to_message_id or proto.metadata.message_id
                self.partial[key] = _Partial(
                    proto, [t.object_id for t in iterate_object_tree(tree)])
        out: list[Message] = []
        for key, part in list(self.partial.items()):
            state = self._fetch(part)
            if state == "waiting":
                continue
            del self.partial[key]
            out.append(self._complete(part) if state == "complete" else self._lost(part, state))
        return out

    def incomplete(self) -> list[str]:
        """Instruction ids whose replies were listed but are not complete (still uploading)."""
        return list(self.partial)

    # -- one reply ----------------------------------------------------------------------------------
    def _fetch(self, part: _Partial) -> str:
        """Download the reply's missing objects while they are there: ``complete``, ``waiting``
        (an object is announced but not uploaded yet) or the reason the reply is lost."""
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_pull_object_fn_protobuf)
        from flwr.supercore.inflatable.inflatable_utils import (ObjectPullError,
                                                                ObjectUnavailableError)

        pull_object = make_pull_object_fn_protobuf(
            pull_object_protobuf=self.grid._runtime_client.PullObject,  # noqa: SLF001
            node=self.grid.node, run_id=self.grid._run.run_id)  # noqa: SLF001
        for object_id in part.object_ids:
            if object_id in part.contents:
                continue
            try:
                part.contents[object_id] = pull_object(object_id)
            except ObjectUnavailableError:
                return "waiting"
            except ObjectPullError as e:
                return str(e)
        return "complete"

    def _complete(self, part: _Partial) -> Message:
        from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest
        from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

        msg_id = part.proto.metadata.message_id
        # As HttpGrid.pull_messages does: the SuperLink may now free the reply's objects.
        self.grid._runtime_client.ConfirmMessageReceived(ConfirmMessageReceivedRequest(  # noqa: SLF001
            node=self.grid.node, run_id=self.grid._run.run_id,  # noqa: SLF001
            message_object_id=msg_id))
        message = inflate_object_from_contents(msg_id, part.contents)
        message.metadata.__dict__["_message_id"] = msg_id
        return message

    def _lost(self, part: _Partial, reason: str) -> Message:
        """The error reply HttpGrid.pull_messages makes for a reply whose objects are gone."""
        from flwr.app import Metadata
        from flwr.app.error import Error
        from flwr.app.message import make_message
        from flwr.common.constant import ErrorCode
        from flwr.supercore.constant import SYSTEM_MESSAGE_TYPE
        from flwr.supercore.date import now

        run_id, node_id = self.grid._run.run_id, self.grid.node.node_id  # noqa: SLF001
        return make_message(
            metadata=Metadata(run_id=run_id, message_id="", src_node_id=node_id,
                              dst_node_id=node_id, message_type=SYSTEM_MESSAGE_TYPE, group_id="",
                              ttl=0, reply_to_message_id=part.proto.metadata.reply_to_message_id,
                              created_at=now().timestamp()),
            error=Error(code=ErrorCode.MESSAGE_UNAVAILABLE,
                        reason="Reply message objects are unavailable. The sender may not have "
                        f"completed the upload before the object-push session expired. {reason}"))
