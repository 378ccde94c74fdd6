"""Live connection changes for Server-Sent Events, fed from JetStream (not from one process).

Each gateway replica keeps one ordered push consumer on the CONNECTION_CHANGES stream and fans
the changes out, in memory, to the SSE clients of the connections they concern. Catching up
after a reconnect (``Last-Event-ID``) reads the stream itself, one connection's subject, so any
replica can resume any client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterator

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from proto.changes import ConnectionChanged, change_decoder
from proto.names import Names

log = logging.getLogger("zapbus.gateway.live")

Change = tuple[int, ConnectionChanged]  # (stream sequence = SSE id, snapshot)
_QUEUE_SIZE = 256
# The most changes one catch-up read returns; a client that missed more starts from the row.
READ_LIMIT = 500


class ChangeHub:
    def __init__(self, js: JetStreamContext, names: Names) -> None:
        self.js = js
        self.names = names
        self._listeners: dict[uuid.UUID, set[asyncio.Queue[Change | None]]] = {}
        self._sub: JetStreamContext.PushSubscription | None = None

    async def start(self) -> None:
        self._sub = await self.js.subscribe(
            self.names.changes_subjects,
            ordered_consumer=True,
            deliver_policy=js_api.DeliverPolicy.NEW,
            cb=self._on_msg,
        )

    async def close(self) -> None:
        """Stop feeding and tell every open stream to end (on shutdown)."""
        for queues in self._listeners.values():
            for queue in queues:
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(None)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_msg(self, msg: Msg) -> None:
        try:
            change = change_decoder.decode(msg.data)
        except msgspec.DecodeError:
            log.warning("undecodable change on %s ignored", msg.subject)
            return
        for queue in list(self._listeners.get(change.connection_id, ())):
            try:
                queue.put_nowait((msg.metadata.sequence.stream, change))
            except asyncio.QueueFull:
                # Drop this listener's backlog and end its stream: the browser reconnects
                # with Last-Event-ID and catches up from the stream.
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)

    @contextlib.contextmanager
    def listen(self, connection_id: uuid.UUID) -> Iterator[asyncio.Queue[Change | None]]:
        """A queue of this connection's changes from now on; ``None`` means "stop"."""
        queue: asyncio.Queue[Change | None] = asyncio.Queue(_QUEUE_SIZE)
        self._listeners.setdefault(connection_id, set()).add(queue)
        try:
            yield queue
        finally:
            listeners = self._listeners.get(connection_id)
            if listeners is not None:
                listeners.discard(queue)
                if not listeners:
                    del self._listeners[connection_id]

    async def last_seq(self, connection_id: uuid.UUID) -> int:
        """Sequence of this connection's latest change on the stream, 0 if none."""
        try:
            msg = await self.js.get_last_msg(
                self.names.changes_stream, self.names.change_subject(connection_id)
            )
        except NotFoundError:
            return 0
        return int(msg.seq or 0)

    async def since(
        self, connection_id: uuid.UUID, after: int, limit: int = READ_LIMIT
    ) -> list[Change]:
        """This connection's changes after stream sequence ``after``, oldest first, at most
        ``limit`` of them."""
        found: list[Change] = []
        seq = after + 1
        subject = self.names.change_subject(connection_id)
        while len(found) < limit:
            try:
                msg = await self.js.get_msg(self.names.changes_stream, seq, subject, next=True)
            except NotFoundError:
                break
            assert msg.data is not None and msg.seq is not None
            found.append((msg.seq, change_decoder.decode(msg.data)))
            seq = msg.seq + 1
        return found

    async def bounds(self) -> tuple[int, int]:
        """(first, last) sequence the stream holds now (first = last + 1 when empty)."""
        info = await self.js.stream_info(self.names.changes_stream)
        return int(info.state.first_seq or 0), int(info.state.last_seq or 0)
