"""A worker stopped mid-command (SIGTERM) hands the command back without spending an attempt.

JetStream counts every delivery; a plain ``nak()`` on shutdown would count the interrupted one
against the command's attempts. The worker instead queues a copy carrying the attempts already
spent (``Zapbus-Attempts-Used``) and acks the interrupted message.
"""

from __future__ import annotations

import uuid

import msgspec

from services.session_worker.app import create_app as create_worker
from tests.stack import FAST_SIM, serve, start_stack, wait_for
from zapbus.config import Settings
from zapbus.tools.localinfra import free_port


async def test_an_interrupted_create_keeps_its_attempt_count(settings: Settings) -> None:
    slow = msgspec.structs.replace(FAST_SIM, create_delay=(4.0, 4.0))
    async with start_stack(
        settings, slow, baileys_timeout_seconds=10.0, reconcile_interval_seconds=3600
    ) as stack:
        connection = await stack.create("interrupted")
        await stack.wait_status(connection["id"], "creating")
        # SIGTERM: the worker drains for its grace period (shorter than the call), then
        # interrupts the command.
        await stack.runners.pop("worker").cleanup()
        stack.runners["worker"] = await serve(create_worker(stack.settings), free_port())

        ready = await stack.wait_status(connection["id"], "qr_ready", timeout=30)
        assert ready["attempts"] == 1

        async def started_twice() -> list[int] | None:
            rows = await stack.pool.fetch(
                "SELECT applied FROM connection_events WHERE connection_id = $1"
                " AND event_type = 'create.started' ORDER BY seq",
                uuid.UUID(connection["id"]),
            )
            return [r["applied"] for r in rows] if len(rows) == 2 else None

        # Both runs recorded (distinct event ids), the second one as attempt 1 again.
        await wait_for("two create.started in history", started_twice)
        assert (await stack.sim("GET", "/_sim/stats"))["created"] == {connection["session_name"]: 1}
