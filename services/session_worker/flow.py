"""What every flow needs: its dependencies (``Deps``, built once in ``app.py``), the run of one
message (``Run``), and the steps the create, delete and pairing-code flows share.

A flow is a function ``(deps, cmd, run) -> Outcome``: it calls the Baileys server, publishes
events and writes the database, and says what should happen to the message; ``outcome.py``
does it. Flows never see the message itself.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypedDict

import asyncpg

from proto.commands import Command
from proto.names import Names
from services.session_worker.actions import Fail, Retry, action_for
from services.session_worker.fence import Fence
from services.session_worker.metrics import WorkerMetrics
from services.session_worker.outcome import GiveUp, Nak
from services.session_worker.placement import OnlyServerPlacements, PlacementPolicy, server_of
from services.session_worker.publish import FlowPublisher
from services.session_worker.retry import RetryPolicy
from services.session_worker.server_pool import Server, ServerPool
from zapbus import db
from zapbus.dialects.errors import BaileysError, RetryableError


@dataclass(frozen=True, kw_only=True)
class Deps:
    """What the flows use, injected (``app.py`` builds it; tests can pass their own)."""

    db: asyncpg.Pool | None  # None: no database (a single server, nothing recorded)
    publish: FlowPublisher
    names: Names
    servers: ServerPool
    placement: PlacementPolicy
    fence: Fence
    retry: RetryPolicy
    metrics: WorkerMetrics
    webhook_base_url: str
    webhook_secret: str
    # how long a command waits for its (unreachable) server before it looks again whether it
    # is still wanted (a failover may have moved its connection)
    wait_slice: float = 5.0
    # the placements asked for together on the only server share a statement (app.py's)
    placements: OnlyServerPlacements | None = None


class _Common(TypedDict):
    event_id: uuid.UUID
    connection_id: uuid.UUID
    generation: int
    occurred_at: datetime
    command_id: uuid.UUID | None


@dataclass(frozen=True, kw_only=True)
class Run:
    """One delivery of one command: its attempt and the message's stream sequence."""

    attempt: int
    seq: int

    def common(self, cmd: Command, tag: str) -> _Common:
        """The fields every event of this run has. Its id is unique per message and attempt:
        the same on a crash's redelivery republish, new for a re-driven, replayed or
        handed-back copy (another message, another sequence)."""
        return {
            "event_id": uuid.uuid5(cmd.command_id, f"{tag}:{self.seq}:{self.attempt}"),
            "connection_id": cmd.connection_id,
            "generation": cmd.generation,
            "occurred_at": datetime.now(UTC),
            "command_id": cmd.command_id,
        }


def interrupted() -> bool:
    """True while this task is being cancelled (the worker is shutting down)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def not_interrupted() -> None:
    """Shutdown: aiohttp may turn the cancellation of a call into a connection error. The
    call did not fail; it was interrupted (the handler hands the command back)."""
    if interrupted():
        raise asyncio.CancelledError


async def retry_or_give_up(
    deps: Deps,
    cmd: Command,
    run: Run,
    exc: BaileysError,
    then: Callable[[Fail], Awaitable[None]] | None = None,
    retrying: Callable[[Retry], Awaitable[None]] | None = None,
) -> Nak | GiveUp:
    """The outcome of a failed call, as ``action_for`` decides; ``then`` runs after the dead
    letter of a command given up on, ``retrying`` before the nak of one tried again."""
    not_interrupted()
    action = action_for(exc, run.attempt, deps.retry)
    if isinstance(action, Retry):
        if retrying is not None:
            await retrying(action)
        return Nak(delay=action.delay, reason=action.reason)
    fail = action

    async def after() -> None:
        if then is not None:
            await then(fail)

    return GiveUp(command=cmd, reason=fail.reason, why=fail.why, attempt=run.attempt, then=after)


async def wait_for(deps: Deps, server: Server, still_wanted: Callable[[], Awaitable[bool]]) -> bool:
    """Wait until ``server`` can be called; False if the command stopped being wanted
    meanwhile (checked every ``wait_slice`` seconds)."""
    while not await server.wait_available(deps.wait_slice):
        if not await still_wanted():
            return False
    return True


async def servers_of(deps: Deps, cmd: Command) -> list[Server]:
    """The server(s) a generation's session may be on: its placement (or, for a delete, the
    server it names)."""
    name = getattr(cmd, "server", None)
    if name is None and deps.db is not None:
        try:
            name = await server_of(deps.db, cmd.connection_id, cmd.generation)
        except db.UNAVAILABLE as exc:
            raise RetryableError(f"placement unknown, database unavailable: {exc}") from exc
    if name is None and deps.servers.only is not None:
        return [deps.servers.only]
    return deps.servers.holding(name)
