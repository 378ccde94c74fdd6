"""``POST /webhooks/baileys/{connection_id}/{generation}/{token}``: verify, parse, publish."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime

import nats.errors
from aiohttp import web

from proto import headers
from proto.events import EVENT_SUBJECT_KIND, Event, QrUpdated, StatusReported, event_encoder
from services.webhook.metrics import metrics_key
from services.webhook.payloads import PayloadError, QrReport, StatusReport, Unknown, parse
from zapbus import signing
from zapbus.httpkit import ProblemError, json_response, log_fields_key
from zapbus.logs import fields
from zapbus.runtime import js_key, settings_key
from zapbus.tokens import session_name, verify_webhook_token

log = logging.getLogger("zapbus.webhook")

PUBLISH_TIMEOUT_SECONDS = 5.0


def _target(request: web.Request) -> tuple[uuid.UUID, int]:
    """Connection id and generation from a URL whose token checks out, else 401."""
    settings = request.app[settings_key]
    try:
        connection_id = uuid.UUID(request.match_info["connection_id"])
        raw_generation = request.match_info["generation"]
        if not (raw_generation.isascii() and raw_generation.isdigit()):
            raise ValueError
        generation = int(raw_generation)
        if not 1 <= generation <= 1_000_000:
            raise ValueError
    except ValueError:
        connection_id, generation = uuid.UUID(int=0), 0
    token = request.match_info["token"]
    if generation == 0 or not verify_webhook_token(
        settings.webhook_secret, connection_id, generation, token
    ):
        request.app[metrics_key].events.labels("unknown", "rejected_token").inc()
        raise ProblemError(
            401,
            "invalid-webhook-token",
            "Invalid webhook token",
            "the URL's token does not match this connection and generation",
        )
    return connection_id, generation


async def receive(request: web.Request) -> web.Response:
    connection_id, generation = _target(request)
    metrics = request.app[metrics_key]
    body = await request.read()
    settings = request.app[settings_key]
    if settings.webhook_signing_secret:
        try:
            signing.verify(
                settings.webhook_signing_secret,
                request.headers,
                body,
                time.time(),
                settings.webhook_signature_tolerance_seconds,
            )
        except signing.SignatureError as exc:
            metrics.events.labels("unknown", "rejected_signature").inc()
            raise ProblemError(
                401, "invalid-webhook-signature", "Invalid webhook signature", str(exc)
            ) from None
    try:
        session, report = parse(body)
    except PayloadError as exc:
        metrics.events.labels("unknown", "rejected_payload").inc()
        raise ProblemError(
            400, "invalid-webhook-payload", "Invalid webhook payload", str(exc), field=exc.field
        ) from None
    if session is not None and session != session_name(connection_id, generation):
        metrics.events.labels("unknown", "rejected_session").inc()
        raise ProblemError(
            400,
            "invalid-webhook-payload",
            "Invalid webhook payload",
            "session does not belong to this webhook URL",
            field="session",
        )
    common = {
        "event_id": uuid.uuid4(),
        "connection_id": connection_id,
        "generation": generation,
        "occurred_at": datetime.now(UTC),
    }
    event: Event
    match report:
        case Unknown(name=name):
            metrics.events.labels("other", "ignored").inc()
            ignored: dict[str, object] = {"event": name, "outcome": "ignored"}
            request[log_fields_key] = ignored
            return json_response({"accepted": False, "reason": "event not used"}, status=202)
        case QrReport(qr=qr):
            event = QrUpdated(**common, qr=qr)  # type: ignore[arg-type]
            kind = "qr.update"
        case StatusReport(status=status, code=code, reason=reason):
            event = StatusReported(**common, status=status, code=code, reason=reason)  # type: ignore[arg-type]
            kind = "session.status"
    # De-duplicated only by an id the sender gave for this delivery: a re-sent webhook is
    # then stored once (within JetStream's duplicate window). Never by the body: two identical
    # bodies can be two real events (close 428, connected, close 428, connected ...); the
    # state machine makes a true repeat a no-op anyway.
    hdrs = {headers.CONNECTION_ID: str(connection_id)}
    if delivery_id := request.headers.get("webhook-id"):
        hdrs[headers.MSG_ID] = f"wh:{connection_id}:{generation}:{delivery_id}"[:200]
    try:
        ack = await request.app[js_key].publish(
            settings.names.event_subject(EVENT_SUBJECT_KIND[type(event)]),
            event_encoder.encode(event),
            timeout=PUBLISH_TIMEOUT_SECONDS,
            headers=hdrs,
        )
    except (nats.errors.Error, TimeoutError) as exc:
        metrics.events.labels(kind, "unavailable").inc()
        log.warning("event not stored: %s", exc, extra=fields(connection_id=str(connection_id)))
        raise ProblemError(
            503,
            "event-store-unavailable",
            "Event store unavailable",
            "the event was not stored; send it again",
        ) from None
    outcome = "duplicate" if ack.duplicate else "accepted"
    metrics.events.labels(kind, outcome).inc()
    request[log_fields_key] = {
        "event": kind,
        "outcome": outcome,
        "seq": ack.seq,
        "generation": generation,
    }
    return json_response({"accepted": True, "duplicate": bool(ack.duplicate)}, status=202)
