"""``GET /v1/connections/{id}/events``: the connection's changes as Server-Sent Events.

The stream starts with the current state (or, with ``Last-Event-ID``, with every change the
client missed), then follows live changes, with a keep-alive comment every 15 s. A
``Last-Event-ID`` the stream cannot answer for (beyond its last sequence, before its first, or
with more missed changes than one read returns) starts from the current state too, never from
silence. At most ``ZAPBUS_SSE_MAX_STREAMS_PER_TENANT`` streams per tenant and replica, of
which at most ``ZAPBUS_SSE_MAX_STREAMS_PER_CLIENT_TOKEN`` per connection with client tokens; a
client that went away frees its slot within ``DISCONNECT_CHECK_SECONDS`` (its closed socket is
seen then, not at the next keep-alive). Event names: ``qr`` when a new QR code arrived,
``status`` otherwise; the data is the connection snapshot; the id is the change's JetStream
sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator

import msgspec
from aiohttp import web

from proto.changes import ConnectionChanged
from services.gateway.live import READ_LIMIT, Change, ChangeHub
from zapbus.httpkit import ProblemError

KEEPALIVE_SECONDS = 15.0
# how often an idle stream looks whether its client is still there (its socket closed)
DISCONNECT_CHECK_SECONDS = 1.0
RETRY_AFTER_SECONDS = 5
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
    pairing_code: str | None = None
    pairing_code_expires_at: str | None = None
    # why it is in this state, from a closed list (docs/architecture.md)
    reason_code: str | None = None
    # the connection's version after this change (as on GET /v1/connections/{id}): the
    # higher is the newer, whatever ``changed_at`` says (null: sent before versions existed)
    version: int | None = None


def _frame(seq: int, change: ConnectionChanged) -> bytes:
    if change.cause == "pairing_code.updated" and change.pairing_code:
        name = "pairing_code"
    else:
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
        pairing_code=change.pairing_code,
        pairing_code_expires_at=(
            change.pairing_code_expires_at.isoformat() if change.pairing_code_expires_at else None
        ),
        reason_code=change.reason_code,
        version=change.version,
    )
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, name.encode(), _json.encode(data))


def last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID", "").strip()
    return int(raw) if raw.isdigit() and len(raw) < 19 else None


class StreamSlots:
    """Counts the open streams on this replica, per tenant and, of those opened with client
    tokens, per connection; ``take`` refuses one too many."""

    def __init__(self, per_tenant: int, per_client_token: int) -> None:
        self.per_tenant = per_tenant
        self.per_client_token = per_client_token
        self._open: dict[uuid.UUID, int] = {}  # tenant -> streams
        self._by_token: dict[uuid.UUID, int] = {}  # connection -> streams of client tokens

    @contextlib.contextmanager
    def take(
        self, tenant_id: uuid.UUID, token_connection: uuid.UUID | None = None
    ) -> Iterator[None]:
        """Hold one of the tenant's slots, and one of the connection's client-token slots when
        ``token_connection`` (the stream is opened with a client token for it); ProblemError
        429 (with Retry-After) if either is full."""
        if self._open.get(tenant_id, 0) >= self.per_tenant:
            raise _too_many(f"at most {self.per_tenant} open event streams per tenant")
        if token_connection is not None:
            if self._by_token.get(token_connection, 0) >= self.per_client_token:
                raise _too_many(
                    f"at most {self.per_client_token} open event streams per connection with"
                    " client tokens"
                )
            _count(self._by_token, token_connection, +1)
        _count(self._open, tenant_id, +1)
        try:
            yield
        finally:
            _count(self._open, tenant_id, -1)
            if token_connection is not None:
                _count(self._by_token, token_connection, -1)


def _count(counts: dict[uuid.UUID, int], key: uuid.UUID, step: int) -> None:
    left = counts.get(key, 0) + step
    if left:
        counts[key] = left
    else:
        del counts[key]


def _too_many(limit: str) -> ProblemError:
    err = ProblemError(429, "too-many-streams", "Too many event streams", f"{limit}; close one")
    err.response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return err


def _gone(request: web.Request) -> bool:
    """Has the client gone away (its connection closed)? aiohttp does not end the handler
    then, and a write into a closed socket fails only later: look at the transport."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def missed(hub: ChangeHub, connection_id: uuid.UUID, resume: int) -> list[Change] | None:
    """The changes after ``resume``, or None if the stream cannot tell them all: ``resume`` is
    beyond its last sequence (another stream, or a forged id), changes after it were already
    removed, or there are more than one read returns."""
    first, last = await hub.bounds()
    if resume > last or resume + 1 < first:
        return None
    found = await hub.since(connection_id, resume, limit=READ_LIMIT + 1)
    return None if len(found) > READ_LIMIT else found


def _already_shown(change: ConnectionChanged, snapshot: ConnectionChanged) -> bool:
    """Is ``change`` part of what the snapshot already showed? Changes travel through the
    outbox, so one committed before the row was read can reach the stream after it: its
    version (every change of the row bumps it) is then not above the snapshot's. Times
    cannot tell: a change's time is its transaction's start, so one committed after the
    snapshot was read can carry an earlier time than the snapshot's."""
    if change.version is not None and snapshot.version is not None:
        return change.version <= snapshot.version
    # a change published before versions existed
    if change.generation != snapshot.generation:
        return change.generation < snapshot.generation
    return change.changed_at <= snapshot.changed_at


async def stream(
    request: web.Request,
    hub: ChangeHub,
    connection_id: uuid.UUID,
    load: Callable[[], Awaitable[ConnectionChanged]],
    ends_at: float | None = None,
) -> web.StreamResponse:
    """Serve the SSE stream; ``load`` reads the connection's current state. ``ends_at`` (unix
    time): the stream ends then (a client token's expiry; the client's retry gets a 401).

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
        backlog = None if resume is None else await missed(hub, connection_id, resume)
        seen: ConnectionChanged | None = None  # the snapshot read from Postgres
        if backlog is not None and resume is not None:
            sent = resume
        else:
            snapshot_seq = await hub.last_seq(connection_id)
            seen = await load()
            backlog = [(snapshot_seq, seen)]
        for seq, change in backlog:
            await resp.write(_frame(seq, change))
            sent = max(sent, seq)
        keepalive_at = time.monotonic() + KEEPALIVE_SECONDS
        while True:
            wait = min(DISCONNECT_CHECK_SECONDS, keepalive_at - time.monotonic())
            if ends_at is not None:
                wait = min(wait, ends_at - time.time())
                if ends_at <= time.time():
                    break
            try:
                async with asyncio.timeout(max(wait, 0.0)):
                    item = await queue.get()
            except TimeoutError:
                if _gone(request):
                    break  # frees its slot now, not when a keep-alive fails
                if time.monotonic() >= keepalive_at and (ends_at is None or time.time() < ends_at):
                    await resp.write(b": keep-alive\n\n")
                    keepalive_at = time.monotonic() + KEEPALIVE_SECONDS
                continue
            if item is None:
                break
            seq, change = item
            if seen is not None and _already_shown(change, seen):
                continue  # relayed after the snapshot was read, but not newer than it
            if seq > sent:
                await resp.write(_frame(seq, change))
                sent = seq
    return resp
