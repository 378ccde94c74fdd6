"""The create flow: fence, place, wait for the server, create the session, fence again.

Fencing (``fence.py``) before and after the call: a create runs only while its row still waits
for that session; a session made for a row that moved on is deleted again (``_undo``). A create
given up on one server of a pool is placed on another before the connection is failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime

from proto.commands import CreateSession, RequestPairingCode
from proto.events import CreateFailed, CreateRetrying, CreateStarted, SessionCreated
from services.session_worker.actions import Fail, Retry, action_for
from services.session_worker.fence import Verdict
from services.session_worker.flow import (
    Deps,
    Run,
    interrupted,
    retry_or_give_up,
    servers_of,
    wait_for,
)
from services.session_worker.outcome import Ack, Nak, Outcome, Term
from services.session_worker.placement import Gone, Placed, Waiting, place, place_elsewhere
from services.session_worker.placement import server_of as placed_server
from services.session_worker.server_pool import Server
from zapbus import db
from zapbus.dialects.base import CreateSessionRequest
from zapbus.dialects.errors import BaileysError, PermanentError, RetryableError, clean_reason
from zapbus.dialects.removal import delete_or_gone
from zapbus.logs import fields
from zapbus.outbox import queue_delete
from zapbus.tokens import webhook_signing_key, webhook_url

log = logging.getLogger("zapbus.session_worker")


async def run_create(deps: Deps, cmd: CreateSession, run: Run) -> Outcome:
    verdict = await deps.fence.check_create(cmd)
    if verdict is Verdict.DONE:
        return Ack(result="fenced")  # an earlier copy made the session; the row moved past it
    if verdict is Verdict.UNDO:
        # Superseded, deleted or failed meanwhile. An earlier call (a timed-out POST the
        # server finished, a copy re-driven by the watchdog) may have made the session: make
        # sure it is gone, retrying like any call if the server does not answer.
        return await _undo(deps, cmd, run)
    try:
        server = await _placed(deps, cmd)
    except BaileysError as exc:
        return await _failed(deps, cmd, run, exc)
    if isinstance(server, str):
        return Ack(result=server)  # waits in Postgres (or moved on); see placement.py
    if not await wait_for(deps, server, lambda: _wanted(deps, cmd)):
        return await _undo(deps, cmd, run)  # moved on (a failover) while unreachable
    # started once its server can be called: a first attempt waiting for an unreachable
    # server leaves the row pending, not "creating" on a server that is not answering
    started = run.common(cmd, "create.started")
    await deps.publish.event(CreateStarted(**started, attempt=run.attempt))
    try:
        async with server.create_slots:
            already = await _create_once(deps, server, cmd, run.attempt)
    except BaileysError as exc:
        server.breaker.record(exc.server_down)
        if await _elsewhere(deps, cmd, run, server, exc):
            return Ack(result="replaced")
        return await _failed(deps, cmd, run, exc)
    server.breaker.record(server_down=False)
    if await deps.fence.check_create(cmd) is Verdict.UNDO:
        # Recreated, deleted or failed while we were creating: remove what we just made, so
        # no session lives behind a row that does not want it.
        return await _undo(deps, cmd, run)
    created = run.common(cmd, "create.succeeded")
    await deps.publish.event(
        SessionCreated(**created, attempt=run.attempt, already_existed=already)
    )
    if cmd.login == "code" and cmd.phone_number:
        await _ask_for_code(deps, cmd)
    return Ack()


async def _failed(deps: Deps, cmd: CreateSession, run: Run, exc: BaileysError) -> Outcome:
    """A failed create: create.retrying and a nak, or (after the dead letter) create.failed."""

    async def retrying(retry: Retry) -> None:
        common = run.common(cmd, "create.retrying")
        await deps.publish.event(
            CreateRetrying(
                **common,
                attempt=run.attempt,
                reason=exc.reason,
                retry_in_seconds=round(retry.delay, 2),
            )
        )

    async def failed(fail: Fail) -> None:
        common = run.common(cmd, "create.failed")
        await deps.publish.event(
            CreateFailed(**common, attempt=run.attempt, reason=fail.reason, reason_code=fail.code)
        )
        if not fail.permanent:
            # A timed-out POST may have made the session after all: a failed row keeps none
            # (the watchdog re-drives the delete; the reconciler is the backstop). A permanent
            # refusal made nothing.
            await _queue_delete(deps, cmd, None)

    return await retry_or_give_up(deps, cmd, run, exc, then=failed, retrying=retrying)


async def _placed(deps: Deps, cmd: CreateSession) -> Server | str:
    """The server of this generation (placed now if it is new), or the outcome when the
    create cannot go on: "waiting" (no room in the pool) or "fenced" (moved on)."""
    if deps.db is None:
        only = deps.servers.only
        assert only is not None, "a pool of several servers needs the database"
        return only
    try:
        placed = await place(
            deps.db, cmd, deps.servers.specs, deps.placement, batch=deps.placements
        )
    except db.UNAVAILABLE as exc:
        if deps.servers.only is not None:
            # One server: nothing to choose; go ahead as the fence does (later calls look
            # for an unrecorded placement on the only server).
            log.warning("placement not recorded, database unavailable: %s", exc)
            return deps.servers.only
        raise RetryableError(f"placement: database unavailable: {exc}") from exc
    match placed:
        case Placed(server=name):
            found = deps.servers.get(name)
            if found is None:
                raise RuntimeError(f"placed on {name!r}, which is not configured")
            return found
        case Waiting(reason=reason):
            log.info("create waits: %s", reason, extra=fields(connection_id=str(cmd.connection_id)))
            return "waiting"
        case Gone():
            return "fenced"
    raise AssertionError(placed)


async def _elsewhere(
    deps: Deps, cmd: CreateSession, run: Run, server: Server, exc: BaileysError
) -> bool:
    """A create given up on one server of a pool (every attempt failed, or it refused for
    good) is placed again on another, before the connection is failed; True if so."""
    if len(deps.servers.servers) < 2 or deps.db is None:
        return False
    if interrupted():
        return False  # shutting down: the command is handed back
    if not isinstance(action_for(exc, run.attempt, deps.retry), Fail):
        return False
    try:
        moved = await place_elsewhere(
            deps.db,
            deps.names,
            cmd,
            server.name,
            deps.servers.specs,
            clean_reason(exc.reason),
            refused=isinstance(exc, PermanentError),
        )
    except db.UNAVAILABLE as err:
        log.warning("could not place a failed create elsewhere: %s", err)
        return False
    if moved:
        log.warning(
            "create failed on %r, placed again on another server: %s",
            server.name,
            exc.reason,
            extra=fields(connection_id=str(cmd.connection_id), generation=cmd.generation),
        )
    return moved


async def _wanted(deps: Deps, cmd: CreateSession) -> bool:
    return await deps.fence.check_create(cmd) in (Verdict.RUN, Verdict.UNKNOWN)


async def _ask_for_code(deps: Deps, cmd: CreateSession) -> None:
    """Code login: queue the one request for this generation's pairing code (the server can
    give it once its socket is open; until then it answers 428 and the request is retried).
    The same message id for every copy of the create: asked once."""
    assert cmd.phone_number is not None
    ask = RequestPairingCode(
        command_id=uuid.uuid5(cmd.command_id, "pairing_code"),
        connection_id=cmd.connection_id,
        tenant_id=cmd.tenant_id,
        generation=cmd.generation,
        session_name=cmd.session_name,
        requested_at=datetime.now(UTC),
        phone_number=cmd.phone_number,
    )
    await deps.publish.command(ask, msg_id=f"{ask.command_id}:g{cmd.generation}")


async def _undo(deps: Deps, cmd: CreateSession, run: Run) -> Outcome:
    """Delete the session a fenced create may have made; done once it is gone. On a server
    that does not answer, the delete is queued (tracked) for when it does."""
    start = time.perf_counter()
    try:
        servers = await servers_of(deps, cmd)
        if servers and not all(s.available for s in servers):
            await _queue_delete(deps, cmd, servers[0].name if len(servers) == 1 else None)
            return Ack(result="fenced")
        for server in servers:
            await delete_or_gone(server.dialect, cmd.session_name, cmd.phone_number)
    except BaileysError as exc:
        deps.metrics.baileys_seconds.labels("delete", "error").observe(time.perf_counter() - start)
        action = action_for(exc, run.attempt, deps.retry)
        if isinstance(action, Fail):
            # The reconciler deletes whatever is left once the server answers again.
            log.warning(
                "could not delete the session of a fenced create: %s",
                exc.reason,
                extra=fields(connection_id=str(cmd.connection_id)),
            )
            return Term(reason=action.reason)
        return Nak(delay=action.delay, reason=action.reason)
    deps.metrics.baileys_seconds.labels("delete", "ok").observe(time.perf_counter() - start)
    return Ack(result="fenced")


async def _create_once(deps: Deps, server: Server, cmd: CreateSession, attempt: int) -> bool:
    """Create the session unless an earlier attempt already did; True if it existed."""
    start = time.perf_counter()
    op, result = "create", "ok"
    try:
        if attempt > 1:
            # The last try may have timed out after the server created it: ask first.
            op = "get"
            if await server.dialect.session_exists(cmd.session_name):
                return True
            op = "create"
        url = webhook_url(
            deps.webhook_base_url,
            deps.webhook_secret,
            cmd.connection_id,
            cmd.generation,
            server.name if len(deps.servers.servers) > 1 else None,
        )
        req = CreateSessionRequest(
            name=cmd.session_name,
            webhook_url=url,
            login="code" if cmd.login == "code" else "qr",
            phone_number=cmd.phone_number,
            webhook_secret=webhook_signing_key(
                deps.webhook_secret, cmd.connection_id, cmd.generation
            ),
        )
        created = await server.dialect.create_session(req)
        return created.already_existed and await _until_shown(server, req)
    except BaileysError:
        result = "error"
        raise
    finally:
        deps.metrics.baileys_seconds.labels(op, result).observe(time.perf_counter() - start)


async def _queue_delete(deps: Deps, cmd: CreateSession, server: str | None) -> None:
    """Queue the deletion of a create's session (given up, or fenced while its server did
    not answer), through the outbox; ``server`` None: where it was placed."""
    if deps.db is None:
        return
    try:
        async with deps.db.acquire() as conn, conn.transaction():
            await queue_delete(
                conn,
                deps.names,
                cmd.connection_id,
                cmd.tenant_id,
                cmd.generation,
                cmd.session_name,
                cmd.phone_number,
                server=server or await placed_server(conn, cmd.connection_id, cmd.generation),
            )
    except db.UNAVAILABLE as exc:
        log.warning(
            "could not queue the delete of a failed create (the reconciler will): %s",
            exc,
            extra=fields(connection_id=str(cmd.connection_id)),
        )


SHOW_POLL_SECONDS = 0.5


async def _until_shown(server: Server, req: CreateSessionRequest) -> bool:
    """A create answered "already exists": True once the server shows the session, False if a
    repeated create made it after all. "Exists" for a session the server cannot show is another
    request still making it (a dead worker's POST, say), which may yet fail: wait for it within
    one call's budget, asking again, without spending an attempt; past that, a retry."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (server.dialect.timeout.total or 30.0)
    while not await server.dialect.session_exists(req.name):
        if loop.time() > deadline:
            raise RetryableError(
                "the server says the session exists but does not show it"
                " (a create still in progress there)"
            )
        await asyncio.sleep(SHOW_POLL_SECONDS)
        if not (await server.dialect.create_session(req)).already_existed:
            return False  # the other request failed; this one made it
    return True
