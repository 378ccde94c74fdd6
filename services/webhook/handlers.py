"""``POST /webhooks/baileys/{connection_id}/{generation}/{token}``: verify, parse, publish."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import nats.errors
from aiohttp import web

from proto import headers
from proto.events import (
    EVENT_SUBJECT_KIND,
    Event,
    PairingCodeShown,
    QrUpdated,
    StatusReported,
    WebhookIgnored,
    event_encoder,
)
from services.webhook.app_keys import dialect_key, publisher_key, server_dialects_key
from services.webhook.metrics import metrics_key
from zapbus import jsretry, signing
from zapbus.dialects.errors import BaileysError
from zapbus.dialects.reports import (
    PairingCodeReport,
    PayloadError,
    QrReport,
    QrToFetch,
    Report,
    StatusReport,
    Unknown,
    checked_qr,
    clean_text,
)
from zapbus.httpkit import ProblemError, json_response, log_fields_key
from zapbus.logs import fields
from zapbus.runtime import settings_key
from zapbus.tokens import session_name, verify_webhook_token, webhook_signing_key

log = logging.getLogger("zapbus.webhook")

# A publish that fails for a leader election (4.5-8.6 s measured on a 3-node cluster) is
# retried within the request, with the same Nats-Msg-Id, for this long in all (tries of
# PUBLISH_TRY_SECONDS) before the sender gets a 503: under a sender's usual 10 s timeout.
PUBLISH_DEADLINE_SECONDS = 9.0
PUBLISH_TRY_SECONDS = 2.0


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
        settings.webhook_secret, connection_id, generation, token, request.query.get("server")
    ):
        request.app[metrics_key].events.labels("unknown", "rejected_token").inc()
        raise ProblemError(
            401,
            "invalid-webhook-token",
            "Invalid webhook token",
            "the URL's token does not match this connection and generation (and server)",
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
    dialect = request.app[dialect_key]
    try:
        delivery = dialect.parse_webhook(
            body,
            request.headers,
            webhook_signing_key(settings.webhook_secret, connection_id, generation),
        )
    except PayloadError as exc:
        metrics.events.labels("unknown", "rejected_payload").inc()
        raise ProblemError(
            400, "invalid-webhook-payload", "Invalid webhook payload", str(exc), field=exc.field
        ) from None
    except signing.SignatureError as exc:
        metrics.events.labels("unknown", "rejected_signature").inc()
        raise ProblemError(
            401, "invalid-webhook-signature", "Invalid webhook signature", str(exc)
        ) from None
    if delivery.session is not None and delivery.session != session_name(connection_id, generation):
        metrics.events.labels("unknown", "rejected_session").inc()
        raise ProblemError(
            400,
            "invalid-webhook-payload",
            "Invalid webhook payload",
            "session does not belong to this webhook URL",
            field="session",
        )
    events = [
        (kind, event)
        for report in delivery.reports
        for kind, event in await _events(request, report, connection_id, generation)
    ]
    # De-duplicated only by an id the sender gave for this delivery: a re-sent webhook is
    # then stored once (within JetStream's duplicate window). Never by the body: two identical
    # bodies can be two real events (close 428, connected, close 428, connected ...); the
    # state machine makes a true repeat a no-op anyway.
    outcomes = []
    for i, (kind, event) in enumerate(events):
        hdrs = {headers.CONNECTION_ID: str(connection_id)}
        if delivery.delivery_id:
            suffix = f":{i}" if i else ""
            hdrs[headers.MSG_ID] = (
                f"wh:{connection_id}:{generation}:{delivery.delivery_id}"[:190] + suffix
            )
        else:
            # No sender id: the event's own (new for every delivery), so only this request's
            # retries of this publish are de-duplicated, never two deliveries.
            hdrs[headers.MSG_ID] = f"ev:{event.event_id}"
        try:
            async with asyncio.timeout(PUBLISH_DEADLINE_SECONDS):
                ack = await jsretry.publish(
                    request.app[publisher_key],
                    settings.names.event_subject(EVENT_SUBJECT_KIND[type(event)], connection_id),
                    event_encoder.encode(event),
                    headers=hdrs,
                    timeout=PUBLISH_TRY_SECONDS,
                    deadline=PUBLISH_DEADLINE_SECONDS,
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
        outcome = "ignored" if kind == "other" else "duplicate" if ack.duplicate else "accepted"
        metrics.events.labels(kind, outcome).inc()
        outcomes.append((kind, outcome, ack))
    request[log_fields_key] = {
        "event": ",".join(k for k, _, _ in outcomes),
        "outcome": ",".join(o for _, o, _ in outcomes),
        "seq": [a.seq for _, _, a in outcomes],
        "generation": generation,
    }
    stored = sum(1 for _, _, a in outcomes if not a.duplicate)  # new events in the stream
    if all(k == "other" for k, _, _ in outcomes):
        reply = {"accepted": False, "reason": "event not used", "stored": stored}
        return json_response(reply, status=202)
    duplicate = all(a.duplicate for k, _, a in outcomes if k != "other")
    return json_response(
        {"accepted": True, "duplicate": bool(duplicate), "stored": stored}, status=202
    )


async def _events(
    request: web.Request, report: Report, connection_id: uuid.UUID, generation: int
) -> list[tuple[str, Event]]:
    """The bus events of one report (metric kind, event)."""
    common: dict[str, Any] = {
        "event_id": uuid.uuid4(),
        "connection_id": connection_id,
        "generation": generation,
        "occurred_at": datetime.now(UTC),
    }
    match report:
        case QrReport(qr=qr):
            return [("qr.update", QrUpdated(**common, qr=qr))]
        case StatusReport(status=status, code=code, reason=reason):
            event = StatusReported(
                **common,
                status=status,
                code=code,
                reason=reason,
                account_phone=report.account_phone,
                account_name=report.account_name,
            )
            return [("session.status", event)]
        case QrToFetch():
            # The server shows a QR but does not send it (WAHA): ask for it now. It may have
            # moved on already (then there is nothing to show): not an error.
            name = session_name(connection_id, generation)
            try:
                fetched = await _fetch_qr(request, name)
            except BaileysError as exc:
                log.warning(
                    "QR not fetched: %s", exc.reason, extra=fields(connection_id=str(connection_id))
                )
                return []
            if fetched is None:
                return []
            return [("qr.update", QrUpdated(**common, qr=checked_qr(fetched, "qr")))]
        case PairingCodeReport(code=code):
            return [("pairing_code", PairingCodeShown(**common, code=code))]
        case Unknown(name=name):
            # kept in history: Postgres text refuses NUL, and the name is the sender's
            return [("other", WebhookIgnored(**common, event=clean_text(name, 100) or "?"))]
    return [("other", WebhookIgnored(**common, event=type(report).__name__))]


async def _fetch_qr(request: web.Request, name: str) -> str | None:
    """The QR of session ``name`` from the server the webhook URL names (``?server=``, set in
    a pool of several); a URL without one (minted before, or a pool of one) asks each
    configured server in turn until one has the session."""
    dialects = request.app[server_dialects_key]
    named = dialects.get(request.query.get("server", ""))
    if named is not None:
        return await named.fetch_qr(name)
    error: BaileysError | None = None
    answered = False
    for dialect in dialects.values():
        try:
            qr = await dialect.fetch_qr(name)
        except BaileysError as exc:
            error = exc
            continue
        answered = True
        if qr is not None:
            return qr
    if error is not None and not answered:
        raise error  # no server answered: say why
    return None
