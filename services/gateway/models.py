"""The gateway's HTTP bodies (contract with the frontend)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

import msgspec

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]


class CreateConnection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/connections``."""

    name: Name


class Connection(msgspec.Struct, frozen=True, kw_only=True):
    """A WhatsApp connection as the frontend sees it."""

    id: uuid.UUID
    name: str
    status: str
    status_reason: str | None
    generation: int
    session_name: str
    qr: str | None
    qr_seq: int
    qr_expires_at: datetime | None
    attempts: int
    created_at: datetime
    updated_at: datetime
    status_changed_at: datetime


class QrCode(msgspec.Struct, frozen=True, kw_only=True):
    """The current QR code; show it to the phone before ``expires_at``."""

    qr: str
    qr_seq: int
    expires_at: datetime | None


class ConnectionList(msgspec.Struct, frozen=True, kw_only=True):
    items: list[Connection]
    next_cursor: str | None


class HistoryEntry(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    generation: int
    event_type: str
    from_status: str | None
    to_status: str | None
    applied: bool
    code: int | None
    reason: str | None
    occurred_at: datetime
    recorded_at: datetime


class History(msgspec.Struct, frozen=True, kw_only=True):
    items: list[HistoryEntry]
    next_cursor: str | None


create_decoder = msgspec.json.Decoder(CreateConnection)


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    """An RFC 9457 problem: ``type`` is stable and names the kind of error."""

    type: str
    title: str
    status: int
    detail: str | None = None
    field: str | None = None
    status_now: str | None = None
