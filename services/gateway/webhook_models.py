"""HTTP bodies of the ``/v1/webhooks`` routes (contract with the tenant's backend)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

import msgspec

EventName = Literal[
    "connection.status", "connection.qr", "connection.pairing_code", "connection.deleted", "*"
]


class CreateWebhook(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/webhooks``: where to send which events (``["*"]``: all)."""

    url: Annotated[str, msgspec.Meta(min_length=1, max_length=2000)]
    events: Annotated[list[EventName], msgspec.Meta(min_length=1, max_length=5)]
    description: Annotated[str, msgspec.Meta(max_length=500)] | None = None


class WebhookEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    """A webhook endpoint; ``enabled`` false with ``disabled_reason`` once it kept failing."""

    id: uuid.UUID
    url: str
    events: list[str]
    description: str | None
    enabled: bool
    disabled_reason: str | None
    disabled_at: datetime | None
    created_at: datetime


class WebhookEndpointWithSecret(WebhookEndpoint, frozen=True, kw_only=True):
    """On creation and rotation only: the signing secret (``whsec_`` + base64)."""

    secret: str


class WebhookEndpointList(msgspec.Struct, frozen=True, kw_only=True):
    items: list[WebhookEndpoint]


class DeliveryAttempt(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt of one delivery (``webhook_id`` is the same on every attempt of it)."""

    webhook_id: str
    type: str
    connection_id: uuid.UUID | None
    state: str  # of the delivery: pending | succeeded | given_up
    attempt: int
    status_code: int | None
    error: str | None
    duration_ms: float
    attempted_at: datetime
    next_attempt_at: datetime | None


class DeliveryAttempts(msgspec.Struct, frozen=True, kw_only=True):
    items: list[DeliveryAttempt]
    next_cursor: str | None


class QueuedDelivery(msgspec.Struct, frozen=True, kw_only=True):
    """A delivery queued by ``/test`` or a replay."""

    webhook_id: str
    type: str
    state: str


create_webhook_decoder = msgspec.json.Decoder(CreateWebhook)


class ConnectionEventData(msgspec.Struct, frozen=True, kw_only=True):
    """A connection webhook's ``data``: the connection as of the change that made it."""

    id: uuid.UUID
    name: str | None
    generation: int
    status: str
    # the status before this change; null only on the create (it had none). A
    # connection.status is sent only when it differs from ``status``.
    previous_status: str | None
    status_reason: str | None
    reason_code: str | None
    qr: str | None
    qr_seq: int
    qr_expires_at: datetime | None
    pairing_code: str | None
    pairing_code_expires_at: datetime | None
    cause: str
    changed_at: datetime
    server: str | None
    # grows with every change of the connection (as on GET /v1/connections/{id}): of two
    # bodies the higher version is the newer, whatever changed_at says
    version: int | None


class ConnectionEvent(msgspec.Struct, frozen=True, kw_only=True):
    """What zapbus POSTs to an endpoint for a connection (``webhook.test`` aside)."""

    type: Literal[
        "connection.status", "connection.qr", "connection.pairing_code", "connection.deleted"
    ]
    timestamp: datetime
    data: ConnectionEventData
