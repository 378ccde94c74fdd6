"""The gateway's HTTP bodies (contract with the frontend)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

import msgspec

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]


Login = Literal["qr", "code"]
# E.164: "+", a country code that does not start with 0, 8 to 15 digits in all.
PhoneNumber = Annotated[str, msgspec.Meta(pattern=r"^\+[1-9][0-9]{7,14}$")]


class CreateConnection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/connections``. ``login`` "code": the user types a pairing code on
    the phone with ``phone_number`` (E.164) instead of scanning a QR. A server keyed by phone
    number (fazer) needs ``phone_number`` and holds one live connection per phone."""

    name: Name
    login: Login = "qr"
    phone_number: PhoneNumber | None = None


class RecreateConnection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Optional body of ``POST /v1/connections/{id}/recreate``: change how it links."""

    login: Login | None = None
    phone_number: PhoneNumber | None = None


class Account(msgspec.Struct, frozen=True, kw_only=True):
    """The WhatsApp account a connection is linked to, as the server reported it."""

    phone: str | None
    name: str | None


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
    login: str = "qr"
    phone_number: str | None = None
    # code login: the code to type on the phone (WhatsApp > Linked devices > Link with phone
    # number) while ``code_ready``, and when it stops working
    pairing_code: str | None = None
    pairing_code_expires_at: datetime | None = None
    # why it is in this state, from a closed list (docs/architecture.md), beside status_reason
    reason_code: str | None = None
    account: Account | None = None
    # the Baileys server this generation is placed on (None until the worker places it)
    server: str | None = None
    # grows with every change of the connection (the ``version`` of each change, SSE event
    # and webhook): the higher one is the newer
    version: int


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
    reason_code: str | None = None
    # the Baileys server it is about (placements, moves), when it is about one
    server: str | None = None


class History(msgspec.Struct, frozen=True, kw_only=True):
    items: list[HistoryEntry]
    next_cursor: str | None


create_decoder = msgspec.json.Decoder(CreateConnection)
recreate_decoder = msgspec.json.Decoder(RecreateConnection)


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    """An RFC 9457 problem: ``type`` is stable and names the kind of error."""

    type: str
    title: str
    status: int
    detail: str | None = None
    field: str | None = None
    status_now: str | None = None


TtlSeconds = Annotated[int, msgspec.Meta(ge=1, le=24 * 3600)]


class ClientTokenRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/connections/{id}/client-token`` (optional): how long the token
    works, at most 24 h."""

    ttl_seconds: TtlSeconds = 600


class ClientTokenIssued(msgspec.Struct, frozen=True, kw_only=True):
    """A client token: read-only access to one connection (its resource, ``/qr``, ``/events``)
    until ``expires_at``, as ``Authorization: Bearer`` or ``?token=``. ``connect_url`` is the
    page that shows its QR code or pairing code to the person who scans."""

    token: str
    expires_at: datetime
    connect_url: str


client_token_decoder = msgspec.json.Decoder(ClientTokenRequest)
