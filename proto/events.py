"""Events on the SESSION_EVENTS stream: what happened to one generation of a connection.

Producers: the session worker (create started / created / retrying / failed, deleted) and the
webhook service (QR and status reported by the Baileys server). The projector folds them into
the connection row. Every event carries its own ``event_id`` (the projector's idempotency key)
and the generation it belongs to (older generations never change the row).
"""

from __future__ import annotations

import uuid
from datetime import datetime

import msgspec


class _Event(msgspec.Struct, frozen=True, kw_only=True):
    event_id: uuid.UUID
    connection_id: uuid.UUID
    generation: int
    occurred_at: datetime
    # The command that led here, so one grep follows a request through every service.
    command_id: uuid.UUID | None = None


class CreateStarted(_Event, frozen=True, kw_only=True, tag="create.started"):
    """The worker began a call to the Baileys server (attempt counts from 1)."""

    attempt: int


class SessionCreated(_Event, frozen=True, kw_only=True, tag="create.succeeded"):
    """The Baileys server accepted the session; a QR code will follow by webhook."""

    attempt: int
    already_existed: bool = False


class CreateRetrying(_Event, frozen=True, kw_only=True, tag="create.retrying"):
    """An attempt failed with a retryable error; the command will be delivered again."""

    attempt: int
    reason: str
    retry_in_seconds: float


class CreateFailed(_Event, frozen=True, kw_only=True, tag="create.failed"):
    """The worker gave up: permanent error or attempts exhausted."""

    attempt: int
    reason: str
    reason_code: str | None = None  # gave_up | bad_credentials | server_refused


class SessionDeleted(_Event, frozen=True, kw_only=True, tag="session.deleted"):
    """The Baileys session of this generation is gone (or never existed)."""

    # The server had no such session (a 404, or a refusal meaning "not found"): nothing was
    # removed by this delete.
    already_gone: bool = False


class QrUpdated(_Event, frozen=True, kw_only=True, tag="qr.updated"):
    """The Baileys server sent a (new) QR code for the session."""

    qr: str


class StatusReported(_Event, frozen=True, kw_only=True, tag="status.reported"):
    """The Baileys server reported a connection status, maybe with a disconnect code."""

    status: str
    code: int | None = None
    reason: str | None = None
    account_phone: str | None = None  # the linked account, when the server says it
    account_name: str | None = None


class PairingCodeShown(_Event, frozen=True, kw_only=True, tag="pairing_code.updated"):
    """A pairing code to type on the phone (code login): asked for by the worker, or pushed
    by the server."""

    code: str


class WebhookIgnored(_Event, frozen=True, kw_only=True, tag="webhook.ignored"):
    """A well-formed delivery reporting nothing zapbus uses (kept in history, never applied)."""

    event: str


class SessionObserved(StatusReported, frozen=True, kw_only=True, tag="reconcile.status"):
    """The reconciler read the session's state on the Baileys server and it contradicts the row.

    Projected exactly like a status webhook (it is one, pulled instead of pushed); its own tag
    marks the history row as the reconciler's.
    """


Event = (
    CreateStarted
    | SessionCreated
    | CreateRetrying
    | CreateFailed
    | SessionDeleted
    | QrUpdated
    | StatusReported
    | SessionObserved
    | WebhookIgnored
    | PairingCodeShown
)

EVENT_SUBJECT_KIND: dict[type[_Event], str] = {
    CreateStarted: "worker",
    SessionCreated: "worker",
    CreateRetrying: "worker",
    CreateFailed: "worker",
    SessionDeleted: "worker",
    QrUpdated: "qr",
    StatusReported: "status",
    SessionObserved: "status",
    WebhookIgnored: "status",
    PairingCodeShown: "qr",
}


def event_type(event: Event) -> str:
    """The wire tag of an event (``qr.updated`` ...), used in history rows and metrics."""
    tag = type(event).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


event_encoder = msgspec.json.Encoder()
event_decoder = msgspec.json.Decoder(Event)
