"""End to end through the simulator: every way a generation ends, and replays that change nothing.

QR timings are shrunk to fractions of a second. After each ending, the simulator re-sends every
webhook of the session twice more (``duplicate``, then ``reverse``); the row must stay exactly as
the clean delivery left it. Those re-sends carry the same bodies, so the webhook service's
Nats-Msg-Id (a hash of the body) makes JetStream drop them as duplicates: the test checks that
too. The projector's own order-independence, for events that do get through twice or out of
order, is the subject of tests/test_transitions_property.py.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from tests.stack import FAST_SIM, Stack, start_stack, wait_for
from zapbus import bus
from zapbus.config import Settings

QUICK_QRS = msgspec.structs.replace(FAST_SIM, qr_first_seconds=0.4, qr_next_seconds=0.25, qr_max=4)
QR_TTLS = {"qr_first_ttl_seconds": 0.4, "qr_next_ttl_seconds": 0.25}


async def _history(stack: Stack, connection_id: str) -> list[dict[str, Any]]:
    async with stack.http.get(
        f"{stack.gateway_url}/v1/connections/{connection_id}/history", headers=stack.auth()
    ) as r:
        assert r.status == 200
        items: list[dict[str, Any]] = (await r.json())["items"]
        return items


async def _row(stack: Stack, connection_id: str) -> dict[str, Any]:
    row = await stack.pool.fetchrow(
        "SELECT * FROM connections WHERE id = $1", uuid.UUID(connection_id)
    )
    return dict(row)


async def _caught_up(stack: Stack) -> None:
    """Wait until the projector has acknowledged every event in the stream."""
    names = stack.settings.names
    nc = await bus.connect(stack.settings.nats_url, "zapbus-test")
    try:

        async def idle() -> bool:
            for partition in range(names.event_partitions):
                info = await nc.jetstream().consumer_info(
                    names.events_stream, names.projector_consumer_of(partition)
                )
                if info.num_pending or info.num_ack_pending:
                    return False
            return True

        await wait_for("the projector to catch up", idle)
    finally:
        await nc.close()


async def _duplicates_seen(stack: Stack) -> float:
    async with stack.http.get(f"{stack.webhook_url}/metrics") as r:
        text = await r.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("zapbus_webhook_events_total{") and 'outcome="duplicate"' in line
    )


async def _replays_change_nothing(stack: Stack, connection: dict[str, Any]) -> None:
    """Re-send the session's webhooks in order and in reverse; the row must not move."""
    await _caught_up(stack)
    await stack.wait_released(connection["id"])
    before = await _row(stack, connection["id"])
    history = len(await _history(stack, connection["id"]))
    duplicates = await _duplicates_seen(stack)
    total = 0
    for mode in ("duplicate", "reverse"):
        sent = (await stack.sim("GET", "/_sim/stats"))["webhooks_sent"]
        path = f"/_sim/sessions/{connection['session_name']}/replay"
        resent = (await stack.sim("POST", path, json={"mode": mode}))["data"]["resent"]
        assert resent >= 3
        total += resent

        async def delivered(sent: int = sent, resent: int = resent) -> bool:
            stats = await stack.sim("GET", "/_sim/stats")
            return bool(stats["webhooks_sent"] >= sent + resent)

        await wait_for(f"the {mode} replay to be delivered", delivered)
        await _caught_up(stack)
        assert await _row(stack, connection["id"]) == before, mode
    assert len(await _history(stack, connection["id"])) == history
    assert await _duplicates_seen(stack) == duplicates + total


async def test_unscanned_rotation_ends_qr_expired_with_every_qr_counted(settings: Settings) -> None:
    async with start_stack(settings, QUICK_QRS, qr_max_refreshes=6, **QR_TTLS) as stack:
        connection = await stack.create("rotation")
        expired = await stack.wait_status(connection["id"], "qr_expired")
        assert expired["qr_seq"] == QUICK_QRS.qr_max
        assert expired["status_reason"] == "QR refs attempts ended"
        assert (expired["qr"], expired["qr_expires_at"]) == (None, None)
        history = await _history(stack, connection["id"])
        shown = [h for h in history if h["event_type"] == "qr.updated" and h["applied"]]
        assert len(shown) == QUICK_QRS.qr_max
        ending = [h for h in history if h["to_status"] == "qr_expired" and h["applied"]]
        assert [h["code"] for h in ending] == [408]
        await _replays_change_nothing(stack, connection)


async def test_more_qrs_than_the_refresh_cap_end_qr_expired_at_the_cap(settings: Settings) -> None:
    sim = msgspec.structs.replace(QUICK_QRS, qr_max=5)
    async with start_stack(settings, sim, qr_max_refreshes=2, **QR_TTLS) as stack:
        connection = await stack.create("capped")
        expired = await stack.wait_status(connection["id"], "qr_expired")
        assert (expired["qr_seq"], expired["status_reason"]) == (2, "qr refresh limit reached")

        async def sim_gave_up() -> bool:
            history = await _history(stack, connection["id"])
            return any(h["code"] == 408 for h in history)  # the simulator's own ending

        await wait_for("the simulator to run out of QR codes", sim_gave_up)
        await _caught_up(stack)
        history = await _history(stack, connection["id"])
        qrs = [h["applied"] for h in history if h["event_type"] == "qr.updated"]
        assert qrs == [True, True, True, False, False]  # two shown, the third ends it
        final = await stack.get(connection["id"])
        assert final[1]["status"] == "qr_expired" and final[1]["qr_seq"] == 2
        await _replays_change_nothing(stack, connection)


async def test_scan_passes_through_pairing_to_connected(settings: Settings) -> None:
    sim = msgspec.structs.replace(QUICK_QRS, qr_first_seconds=0.3, qr_next_seconds=60.0)
    async with start_stack(settings, sim) as stack:
        connection = await stack.create("scanned")

        async def second_qr() -> Any:
            _, body = await stack.get(connection["id"])
            return body if body["qr_seq"] == 2 else None

        ready = await wait_for("the second QR code", second_qr)
        assert ready["status"] == "qr_ready" and ready["qr"].startswith("2@")
        await stack.sim("POST", f"/_sim/sessions/{connection['session_name']}/scan")
        connected = await stack.wait_status(connection["id"], "connected")
        assert (connected["qr"], connected["qr_expires_at"], connected["qr_seq"]) == (None, None, 2)
        assert connected["status_reason"] is None

        history = await _history(stack, connection["id"])
        applied = [h["to_status"] for h in history if h["applied"]]
        assert applied[-4:] == ["qr_ready", "qr_ready", "pairing", "connected"]
        pairing = next(h for h in history if h["to_status"] == "pairing" and h["applied"])
        assert pairing["code"] == 515
        await _replays_change_nothing(stack, connection)


async def test_logout_ends_logged_out(settings: Settings) -> None:
    sim = msgspec.structs.replace(QUICK_QRS, qr_first_seconds=60.0)
    async with start_stack(settings, sim) as stack:
        connection = await stack.create("leaving")
        await stack.wait_status(connection["id"], "qr_ready")
        await stack.sim("POST", f"/_sim/sessions/{connection['session_name']}/scan")
        await stack.wait_status(connection["id"], "connected")
        await stack.sim("POST", f"/_sim/sessions/{connection['session_name']}/logout")
        out = await stack.wait_status(connection["id"], "logged_out")
        assert (out["status_reason"], out["qr"], out["qr_expires_at"]) == ("loggedOut", None, None)
        history = await _history(stack, connection["id"])
        assert [h["code"] for h in history if h["to_status"] == "logged_out"] == [401]
        await _replays_change_nothing(stack, connection)
