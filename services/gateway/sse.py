"""``GET /v1/connections/{id}/events``: the connection's changes as Server-Sent Events.

The stream starts with the current state (or, with ``Last-Event-ID``, with every change the
client missed), then follows live changes, with a keep-alive comment every 15 s. Event names:
``qr`` when a new QR code arrived, ``status`` otherwise; the data is the connection snapshot;
the id is the change's JetStream sequence.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

from proto.changes import ConnectionChanged
from services.gateway.live import Change, ChangeHub

KEEPALIVE_SECONDS = 15.0
_json = msgspec.json.Encoder()


class LiveEvent(msgspec.Struct, frozen=True, kw_only=True):
    """The ``data`` of one SSE event."""

    id: uuid.UUID
    generation: int
    status: str
    status_reason: str | None
    qr: str | None
    qr_seq: int
    qr_expires_at: str | None
    cause: str
    changed_at: str


def _frame(seq: int, change: ConnectionChanged) -> bytes:
    name = "qr" if change.cause == "qr.updated" and change.qr else "status"
    data = LiveEvent(
        id=change.connection_id,
        generation=change.generation,
        status=change.status,
        status_reason=change.status_reason,
        qr=change.qr,
        qr_seq=change.qr_seq,
        qr_expires_at=change.qr_expires_at.isoformat() if change.qr_expires_at else None,
        cause=change.cause,
        changed_at=change.changed_at.isoformat(),
    )
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, name.encode(), _json.encode(data))


def last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID", "").strip()
    return int(raw) if raw.isdigit() and len(raw) < 19 else None


async def stream(
    request: web.Request,
    hub: ChangeHub,
    connection_id: uuid.UUID,
    load: Callable[[], Awaitable[ConnectionChanged]],
) -> web.StreamResponse:
    """Serve the SSE stream; ``load`` reads the connection's current state.

    The listener is registered before the state is read, and the state is read after the
    latest change's sequence is taken, so no change can fall between the two.
    """
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    with hub.listen(connection_id) as queue:
        await resp.prepare(request)
        sent = 0
        resume = last_event_id(request)
        backlog: list[Change] = []
        if resume is not None and resume + 1 >= await hub.oldest_seq():
            backlog = await hub.since(connection_id, resume)
            sent = resume
        else:
            snapshot_seq = await hub.last_seq(connection_id)
            backlog = [(snapshot_seq, await load())]
        for seq, change in backlog:
            await resp.write(_frame(seq, change))
            sent = max(sent, seq)
        while True:
            try:
                async with asyncio.timeout(KEEPALIVE_SECONDS):
                    item = await queue.get()
            except TimeoutError:
                await resp.write(b": keep-alive\n\n")
                continue
            if item is None:
                break
            seq, change = item
            if seq > sent:
                await resp.write(_frame(seq, change))
                sent = seq
    return resp
