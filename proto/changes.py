"""Connection changes: a snapshot of a connection after each applied transition.

Published on the CONNECTION_CHANGES stream, one subject per connection
(``<ns>.chg.<connection id>``), by whoever changed the row (the projector, the gateway, the
watchdog), always through the outbox in the same transaction as the row, so the stream
misses no change: the notifier turns them into webhooks. The gateway streams them as
Server-Sent Events; the stream sequence is the SSE event id, so a client resumes with
``Last-Event-ID`` from any gateway replica.
"""

from __future__ import annotations

import uuid
from datetime import datetime

import msgspec


class ConnectionChanged(msgspec.Struct, frozen=True, kw_only=True):
    connection_id: uuid.UUID
    generation: int
    status: str
    status_reason: str | None
    qr: str | None
    qr_seq: int
    qr_expires_at: datetime | None
    cause: str  # the event type that caused it, e.g. "qr.updated"
    changed_at: datetime
    pairing_code: str | None = None
    pairing_code_expires_at: datetime | None = None
    # why it is in this state, from a closed list (docs/architecture.md)
    reason_code: str | None = None
    # the status before this change (None only on a connection's first change,
    # create.requested: it had none); the notifier tells a state change from a new QR or code
    # by it
    previous_status: str | None = None
    # the Baileys server the generation is placed on (None: not placed yet)
    server: str | None = None
    # the row's version after this change: every change of the row bumps it, so of two changes
    # (or a change and a read of the row) the higher version is the newer, whatever their
    # times say (None: published before versions existed)
    version: int | None = None


change_encoder = msgspec.json.Encoder()
change_decoder = msgspec.json.Decoder(ConnectionChanged)
