"""The projector against real JetStream and Postgres: batches, redelivery, poison events."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from proto import headers
from proto.events import EVENT_SUBJECT_KIND, Event, QrUpdated, StatusReported, event_encoder
from tests.stack import Stack, wait_for
from zapbus import bus


async def _publish(stack: Stack, *events: Event) -> None:
    nc = await bus.connect(stack.settings.nats_url, "zapbus-test")
    try:
        js = nc.jetstream()
        for event in events:
            await js.publish(
                stack.settings.names.event_subject(
                    EVENT_SUBJECT_KIND[type(event)], event.connection_id
                ),
                event_encoder.encode(event),
                headers={headers.MSG_ID: str(event.event_id)},
            )
    finally:
        await nc.close()


async def test_an_event_postgres_refuses_is_set_aside_and_the_rest_applied(stack: Stack) -> None:
    created = await stack.create("poison")
    await stack.wait_status(created["id"], "qr_ready")
    cid = uuid.UUID(created["id"])
    common = {"connection_id": cid, "generation": 1, "occurred_at": datetime.now(UTC)}
    # NUL is not storable in a Postgres text column; the webhook strips it, a buggy
    # producer might not.
    poison = StatusReported(
        event_id=uuid.uuid4(), status="connected", reason="bad\u0000text", **common
    )  # type: ignore[arg-type]
    good = QrUpdated(event_id=uuid.uuid4(), qr="2@after-the-poison", **common)  # type: ignore[arg-type]
    await _publish(stack, poison, good)

    async def good_applied() -> bool:
        _, body = await stack.get(created["id"])
        return bool(body["qr"] == "2@after-the-poison")

    await wait_for("the event after the poison one to be applied", good_applied)
    seen = {
        r["event_id"]
        for r in await stack.pool.fetch(
            "SELECT event_id FROM connection_events WHERE connection_id = $1", cid
        )
    }
    assert good.event_id in seen and poison.event_id not in seen
    async with stack.http.get(f"{stack.projector_url}/metrics") as r:
        rejected = 'event_type="status.reported",outcome="rejected"} 1.0'
        assert rejected in await r.text()


async def test_a_redelivered_batch_changes_nothing(stack: Stack) -> None:
    created = await stack.create("twice")
    await stack.wait_status(created["id"], "qr_ready")
    cid = uuid.UUID(created["id"])
    event = QrUpdated(
        event_id=uuid.uuid4(),
        connection_id=cid,
        generation=1,
        occurred_at=datetime.now(UTC),
        qr="2@once",
    )
    await _publish(stack, event)

    async def applied() -> bool:
        return bool((await stack.get(created["id"]))[1]["qr"] == "2@once")

    await wait_for("the QR to be applied", applied)
    before = await stack.get(created["id"])
    rows = await stack.pool.fetchval("SELECT count(*) FROM connection_events")
    # The same event under another Nats-Msg-Id, as after a redelivery past the dedupe window.
    nc = await bus.connect(stack.settings.nats_url, "zapbus-test")
    try:
        await nc.jetstream().publish(
            stack.settings.names.event_subject("qr", event.connection_id),
            event_encoder.encode(event),
            headers={headers.MSG_ID: f"again-{event.event_id}"},
        )
    finally:
        await nc.close()

    async def consumed() -> bool:
        async with stack.http.get(f"{stack.projector_url}/metrics") as r:
            return 'event_type="qr.updated",outcome="duplicate"} 1.0' in await r.text()

    await wait_for("the copy to be seen as a duplicate", consumed)
    assert await stack.get(created["id"]) == before
    assert await stack.pool.fetchval("SELECT count(*) FROM connection_events") == rows
