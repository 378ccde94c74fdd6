"""Carries out one command against the Baileys server and maps the result to a JetStream action.

success -> event + ``ack()``; retryable error -> event + ``nak(delay)``; permanent error or the
last delivery -> dead letter + failed event + ``term()``. During the (slow) call the message is
kept alive with ``in_progress()`` and the row is held (``holds.py``) so the watchdog waits.

Fencing (``fence.py``) before and after the call: a create runs only while its row still waits
for that session; a session made for a row that moved on is deleted again.

Event and dead-letter ids are derived from the command id, the message's stream sequence and
its delivery count: a crash and redelivery of one message republishes the same ids (nothing is
counted twice), while a re-driven or replayed command (a new message) gets new ones, so its
history and dead letters are never swallowed as duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import TypedDict

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from proto import headers
from proto.commands import (
    Command,
    CreateSession,
    DeadLetter,
    DeleteSession,
    RequestPairingCode,
    command_decoder,
    command_encoder,
    dead_letter_encoder,
)
from proto.events import (
    EVENT_SUBJECT_KIND,
    CreateFailed,
    CreateRetrying,
    CreateStarted,
    Event,
    PairingCodeShown,
    SessionCreated,
    SessionDeleted,
    event_encoder,
    event_type,
)
from proto.names import Names
from services.session_worker.actions import Action, action_for
from services.session_worker.fence import Fence, Verdict
from services.session_worker.holds import Holds
from services.session_worker.metrics import WorkerMetrics
from services.session_worker.placement import (
    Gone,
    Placed,
    Waiting,
    place,
    place_elsewhere,
    server_of,
)
from services.session_worker.placement import PlacementPolicy as Policy
from services.session_worker.retry import RetryPolicy
from services.session_worker.server_pool import Server, ServerPool
from zapbus import db, jsretry
from zapbus.dialects.base import CreateSessionRequest
from zapbus.dialects.errors import BaileysError, PermanentError, RetryableError, clean_reason
from zapbus.dialects.removal import delete_or_gone
from zapbus.logs import fields
from zapbus.outbox import queue_delete, untrack_delete
from zapbus.tokens import webhook_signing_key, webhook_url

log = logging.getLogger("zapbus.session_worker")


def _attempts_used(msg: Msg) -> int:
    """Attempts spent by earlier copies of this command (header set by ``_hand_back``)."""
    raw = (msg.headers or {}).get(headers.ATTEMPTS_USED, "0")
    return int(raw) if raw.isdigit() else 0


def _reachable(server: Server) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return server.down_since is None

    return check


class _Common(TypedDict):
    event_id: uuid.UUID
    connection_id: uuid.UUID
    generation: int
    occurred_at: datetime
    command_id: uuid.UUID | None


class CommandHandler:
    def __init__(
        self,
        js: JetStreamContext,
        names: Names,
        servers: ServerPool,
        retry: RetryPolicy,
        metrics: WorkerMetrics,
        webhook_base_url: str,
        webhook_secret: str,
        heartbeat_seconds: float,
        fence: Fence,
        holds: Holds | None = None,
        placement: Policy | None = None,
        # how long a command waits for its (unreachable) server before it looks again
        # whether it is still wanted (a failover may have moved its connection)
        wait_slice_seconds: float = 5.0,
    ) -> None:
        self.js = js
        self.names = names
        self.servers = servers
        self.placement = placement or Policy()
        self.wait_slice = wait_slice_seconds
        self.retry = retry
        self.metrics = metrics
        self.webhook_base_url = webhook_base_url
        self.webhook_secret = webhook_secret
        self.heartbeat_seconds = heartbeat_seconds
        self.fence = fence
        self.holds = holds or Holds(None, heartbeat_seconds, heartbeat_seconds * 3)

    async def prime(self, msgs: list[Msg]) -> None:
        """Fence-check a fetched batch of creates with one query (see Fence.prime)."""
        ids = []
        for msg in msgs:
            try:
                cmd = command_decoder.decode(msg.data)
            except msgspec.DecodeError:
                continue  # handle() deals with it
            if isinstance(cmd, CreateSession):
                ids.append(cmd.connection_id)
        await self.fence.prime(ids)

    async def handle(self, msg: Msg) -> None:
        start = time.perf_counter()
        # The attempt is this message's delivery count plus what earlier copies spent: a
        # command interrupted by a shutdown is handed back as a copy that keeps its count
        # (_hand_back), so a SIGTERM does not spend an attempt.
        delivery = msg.metadata.num_delivered or 1
        attempt = _attempts_used(msg) + delivery
        try:
            cmd = command_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            await self._dead_letter(msg, None, str(exc), "undecodable", attempt)
            await msg.term()
            self.metrics.failures.labels("unknown", "undecodable").inc()
            log.error("undecodable command terminated", extra=fields(subject=msg.subject))
            return
        self.metrics.in_flight.inc()
        outcome = "error"
        try:
            # Heartbeat from the first fence check to the ack: a slow database (each call is
            # bounded by its timeouts) or a slow server never lets ack_wait run out, so no
            # second copy of this command runs in parallel.
            async with self._heartbeat(msg):
                match cmd:
                    case CreateSession():
                        with self.holds.hold(cmd.connection_id):
                            outcome = await self._create(msg, cmd, attempt)
                    case DeleteSession():
                        outcome = await self._delete(msg, cmd, attempt)
                    case RequestPairingCode():
                        outcome = await self._pairing_code(msg, cmd, attempt)
        except asyncio.CancelledError:
            outcome = "interrupted"
            await asyncio.shield(self._hand_back(msg, cmd, attempt))
            raise
        finally:
            self.metrics.in_flight.dec()
            self.metrics.commands.labels(cmd.kind, outcome).inc()
            log.info(
                "command %s",
                outcome,
                extra=fields(
                    command=cmd.kind,
                    connection_id=str(cmd.connection_id),
                    generation=cmd.generation,
                    command_id=str(cmd.command_id),
                    subject=msg.subject,
                    seq=msg.metadata.sequence.stream,
                    delivered=delivery,
                    attempt=attempt,
                    ms=round((time.perf_counter() - start) * 1000, 1),
                ),
            )

    async def _create(self, msg: Msg, cmd: CreateSession, attempt: int) -> str:
        verdict = await self.fence.check_create(cmd)
        if verdict is Verdict.DONE:
            await msg.ack()  # an earlier copy made the session and the row moved past it
            return "fenced"
        if verdict is Verdict.UNDO:
            # Superseded, deleted or failed meanwhile. An earlier call (a timed-out POST the
            # server finished, a copy re-driven by the watchdog) may have made the session:
            # make sure it is gone, retrying like any call if the server does not answer.
            return await self._undo_create(msg, cmd, attempt)
        try:
            server = await self._placed(cmd)
        except BaileysError as exc:
            return await self._on_error(msg, cmd, attempt, exc)
        if isinstance(server, str):
            await msg.ack()  # waits in Postgres (or moved on); see placement.py
            return server
        if not await self._wait_for(server, lambda: self._create_wanted(cmd)):
            # moved on (a failover) while its server was unreachable
            return await self._undo_create(msg, cmd, attempt)
        # started once its server can be called: a first attempt waiting for an unreachable
        # server leaves the row pending, not "creating" on a server that is not answering
        common = self._common(msg, cmd, "create.started", attempt)
        await self._emit(CreateStarted(**common, attempt=attempt))
        try:
            async with server.create_slots:
                already = await self._create_once(server, cmd, attempt)
        except BaileysError as exc:
            server.breaker.record(exc.server_down)
            if await self._elsewhere(msg, cmd, attempt, server, exc):
                return "replaced"
            return await self._on_error(msg, cmd, attempt, exc)
        server.breaker.record(server_down=False)
        if await self.fence.check_create(cmd, fresh=True) is Verdict.UNDO:
            # Recreated, deleted or failed while we were creating: remove what we just made,
            # so no session lives behind a row that does not want it.
            return await self._undo_create(msg, cmd, attempt)
        common = self._common(msg, cmd, "create.succeeded", attempt)
        await self._emit(SessionCreated(**common, attempt=attempt, already_existed=already))
        if cmd.login == "code" and cmd.phone_number:
            await self._ask_for_code(msg, cmd, attempt)
        await msg.ack()
        return "succeeded"

    async def _placed(self, cmd: CreateSession) -> Server | str:
        """The server of this generation (placed now if it is new), or the outcome when the
        create cannot go on: "waiting" (no room in the pool) or "fenced" (moved on)."""
        if self.fence.pool is None:
            only = self.servers.only
            assert only is not None, "a pool of several servers needs the database"
            return only
        try:
            placed = await place(self.fence.pool, cmd, self.servers.specs, self.placement)
        except db.UNAVAILABLE as exc:
            if self.servers.only is not None:
                # One server: nothing to choose; go ahead as the fence does (later calls
                # look for an unrecorded placement on the only server).
                log.warning("placement not recorded, database unavailable: %s", exc)
                return self.servers.only
            raise RetryableError(f"placement: database unavailable: {exc}") from exc
        match placed:
            case Placed(server=name):
                found = self.servers.get(name)
                if found is None:
                    raise RuntimeError(f"placed on {name!r}, which is not configured")
                return found
            case Waiting(reason=reason):
                log.info(
                    "create waits: %s",
                    reason,
                    extra=fields(connection_id=str(cmd.connection_id)),
                )
                return "waiting"
            case Gone():
                return "fenced"
        raise AssertionError(placed)

    async def _elsewhere(
        self, msg: Msg, cmd: CreateSession, attempt: int, server: Server, exc: BaileysError
    ) -> bool:
        """A create given up on one server of a pool (every attempt failed, or it refused
        for good) is placed again on another, before the connection is failed; True if so."""
        if len(self.servers.servers) < 2 or self.fence.pool is None:
            return False
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            return False  # shutting down: _on_error hands the command back
        if action_for(exc, self.retry.is_last(attempt)) is not Action.GIVE_UP:
            return False
        try:
            moved = await place_elsewhere(
                self.fence.pool,
                self.names,
                cmd,
                server.name,
                self.servers.specs,
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
            await msg.ack()
        return moved

    async def _create_wanted(self, cmd: CreateSession) -> bool:
        return await self.fence.check_create(cmd, fresh=True) in (Verdict.RUN, Verdict.UNKNOWN)

    async def _wait_for(self, server: Server, still_wanted: Callable[[], Awaitable[bool]]) -> bool:
        """Wait until ``server`` can be called; False if the command stopped being wanted
        meanwhile (checked every ``wait_slice`` seconds)."""
        while not await server.wait_available(self.wait_slice):
            if not await still_wanted():
                return False
        return True

    async def _servers_of(self, cmd: Command) -> list[Server]:
        """The server(s) a generation's session may be on: its placement (or, for a delete,
        the server it names)."""
        name = getattr(cmd, "server", None)
        if name is None and self.fence.pool is not None:
            try:
                name = await server_of(self.fence.pool, cmd.connection_id, cmd.generation)
            except db.UNAVAILABLE as exc:
                raise RetryableError(f"placement unknown, database unavailable: {exc}") from exc
        if name is None and self.servers.only is not None:
            return [self.servers.only]
        return self.servers.holding(name)

    async def _ask_for_code(self, msg: Msg, cmd: CreateSession, attempt: int) -> None:
        """Code login: queue the one request for this generation's pairing code (the server
        can give it once its socket is open; until then it answers 428 and the request is
        retried). The same message id for every copy of the create: asked once."""
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
        await jsretry.publish(
            self.js,
            self.names.command_subject(ask.kind),
            command_encoder.encode(ask),
            headers={
                headers.MSG_ID: f"{ask.command_id}:g{cmd.generation}",
                headers.COMMAND_ID: str(ask.command_id),
                headers.CONNECTION_ID: str(ask.connection_id),
            },
        )

    async def _pairing_code(self, msg: Msg, cmd: RequestPairingCode, attempt: int) -> str:
        if await self.fence.check_pairing_code(cmd) is Verdict.DONE:
            await msg.ack()  # linked, failed or superseded meanwhile: no code wanted
            return "fenced"
        start = time.perf_counter()
        try:
            servers = await self._servers_of(cmd)
            if len(servers) != 1:
                raise RetryableError("the connection is not placed on a server yet")
            server = servers[0]
            await server.wait_available(self.wait_slice)
            code = await server.dialect.request_pairing_code(cmd.session_name, cmd.phone_number)
        except BaileysError as exc:
            self.metrics.baileys_seconds.labels("pairing_code", "error").observe(
                time.perf_counter() - start
            )
            return await self._on_error(msg, cmd, attempt, exc)
        self.metrics.baileys_seconds.labels("pairing_code", "ok").observe(
            time.perf_counter() - start
        )
        common = self._common(msg, cmd, "pairing_code.updated", attempt)
        await self._emit(PairingCodeShown(**common, code=code))
        await msg.ack()
        return "succeeded"

    async def _undo_create(self, msg: Msg, cmd: CreateSession, attempt: int) -> str:
        """Delete the session a fenced create may have made; ack once it is gone. On a server
        that does not answer, the delete is queued (tracked) for when it does."""
        start = time.perf_counter()
        try:
            servers = await self._servers_of(cmd)
            if servers and not all(s.available for s in servers):
                await self._queue_delete(cmd, servers[0].name if len(servers) == 1 else None)
                await msg.ack()
                return "fenced"
            for server in servers:
                await delete_or_gone(server.dialect, cmd.session_name, cmd.phone_number)
        except BaileysError as exc:
            self.metrics.baileys_seconds.labels("delete", "error").observe(
                time.perf_counter() - start
            )
            if action_for(exc, self.retry.is_last(attempt)) is Action.GIVE_UP:
                # The reconciler deletes whatever is left once the server answers again.
                log.warning(
                    "could not delete the session of a fenced create: %s",
                    exc.reason,
                    extra=fields(connection_id=str(cmd.connection_id)),
                )
                await msg.term()
                return "fenced"
            await msg.nak(delay=self.retry.delay(attempt))
            return "retried"
        self.metrics.baileys_seconds.labels("delete", "ok").observe(time.perf_counter() - start)
        await msg.ack()
        return "fenced"

    async def _create_once(self, server: Server, cmd: CreateSession, attempt: int) -> bool:
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
                self.webhook_base_url,
                self.webhook_secret,
                cmd.connection_id,
                cmd.generation,
                server.name if len(self.servers.servers) > 1 else None,
            )
            created = await server.dialect.create_session(
                CreateSessionRequest(
                    name=cmd.session_name,
                    webhook_url=url,
                    login="code" if cmd.login == "code" else "qr",
                    phone_number=cmd.phone_number,
                    webhook_secret=webhook_signing_key(
                        self.webhook_secret, cmd.connection_id, cmd.generation
                    ),
                )
            )
            return created.already_existed
        except BaileysError:
            result = "error"
            raise
        finally:
            self.metrics.baileys_seconds.labels(op, result).observe(time.perf_counter() - start)

    async def _delete(self, msg: Msg, cmd: DeleteSession, attempt: int) -> str:
        if await self.fence.check_delete(cmd) is Verdict.DONE:
            # The row's current generation wants this session again (a replayed create, or
            # the reconciler's re-create): deleting it now would undo that.
            await self._untrack(cmd)
            await msg.ack()
            return "fenced"
        start = time.perf_counter()
        server: Server | None = None
        removed = False  # False: the server had no such session (404 or alike)
        try:
            servers = await self._servers_of(cmd)
            if not servers:
                # Placed on a server no longer configured: it cannot be called. Tracked, not
                # done (the operator sees it in session_deletes and the worker's log).
                log.warning(
                    "delete deferred: the session's Baileys server is not configured",
                    extra=fields(connection_id=str(cmd.connection_id), session=cmd.session_name),
                )
                await msg.ack()
                return "deferred"
            for server in servers:
                if not await self._wait_for(server, _reachable(server)):
                    # Unreachable (the pool manager's probes fail): not worth retries and
                    # dead letters. The delete stays tracked; the watchdog re-drives it and
                    # the reconciler finds the session once the server answers again.
                    await msg.ack()
                    return "deferred"
                if server.dialect.keys_by_phone and await self.fence.phone_serves_another(cmd):
                    continue  # the phone's server connection is another connection's now
                removed |= await delete_or_gone(server.dialect, cmd.session_name, cmd.phone_number)
                server.breaker.record(server_down=False)
        except BaileysError as exc:
            if server is not None:
                server.breaker.record(exc.server_down)
            self.metrics.baileys_seconds.labels("delete", "error").observe(
                time.perf_counter() - start
            )
            return await self._on_error(msg, cmd, attempt, exc)
        self.metrics.baileys_seconds.labels("delete", "ok").observe(time.perf_counter() - start)
        common = self._common(msg, cmd, "session.deleted", attempt)
        await self._emit(SessionDeleted(**common, already_gone=not removed))
        await self._untrack(cmd)
        await msg.ack()
        return "succeeded"

    async def _on_error(self, msg: Msg, cmd: Command, attempt: int, exc: BaileysError) -> str:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Shutdown: aiohttp may turn the cancellation of a call into a connection error.
            # The call did not fail; it was interrupted (handed back, no attempt spent).
            raise asyncio.CancelledError
        if action_for(exc, self.retry.is_last(attempt)) is Action.GIVE_UP:
            permanent = isinstance(exc, PermanentError)
            why = "permanent" if permanent else "exhausted"
            reason = exc.reason if permanent else f"gave up after {attempt} attempts: {exc.reason}"
            reason = clean_reason(reason)
            await self._dead_letter(msg, cmd, reason, why, attempt)
            if isinstance(cmd, CreateSession):
                common = self._common(msg, cmd, "create.failed", attempt)
                if not permanent:
                    code = "gave_up"
                elif exc.status in (401, 403):
                    code = "bad_credentials"
                else:
                    code = "server_refused"
                await self._emit(
                    CreateFailed(**common, attempt=attempt, reason=reason, reason_code=code)
                )
                if not permanent:
                    # A timed-out POST may have made the session after all: a failed row
                    # keeps none (the watchdog re-drives the delete; the reconciler is the
                    # backstop). A permanent refusal made nothing.
                    await self._queue_delete(cmd, None)
            await msg.term()
            self.metrics.failures.labels(cmd.kind, why).inc()
            return "failed"
        delay = self.retry.delay(attempt)
        if isinstance(cmd, CreateSession):
            common = self._common(msg, cmd, "create.retrying", attempt)
            await self._emit(
                CreateRetrying(
                    **common, attempt=attempt, reason=exc.reason, retry_in_seconds=round(delay, 2)
                )
            )
        await msg.nak(delay=delay)
        return "retried"

    async def _hand_back(self, msg: Msg, cmd: Command, attempt: int) -> None:
        """Shutdown mid-command: queue a copy that has not spent this attempt, then ack this
        message (a plain nak would count a delivery). If the copy cannot be queued, nak."""
        hdrs = {
            headers.MSG_ID: f"{cmd.command_id}:resume:{msg.metadata.sequence.stream}",
            headers.COMMAND_ID: str(cmd.command_id),
            headers.CONNECTION_ID: str(cmd.connection_id),
            headers.ATTEMPTS_USED: str(attempt - 1),
        }
        try:
            await self.js.publish(msg.subject, msg.data, headers=hdrs, timeout=2.0)
            await msg.ack()
        except Exception as exc:
            log.warning("could not hand back an interrupted command, nak: %r", exc)
            with contextlib.suppress(Exception):
                await msg.nak()

    async def _queue_delete(self, cmd: CreateSession, server: str | None) -> None:
        """Queue the deletion of a create's session (given up, or fenced while its server
        did not answer), through the outbox; ``server`` None: where it was placed."""
        if self.fence.pool is None:
            return
        try:
            async with self.fence.pool.acquire() as conn, conn.transaction():
                await queue_delete(
                    conn,
                    self.names,
                    cmd.connection_id,
                    cmd.tenant_id,
                    cmd.generation,
                    cmd.session_name,
                    cmd.phone_number,
                    server=server or await server_of(conn, cmd.connection_id, cmd.generation),
                )
        except db.UNAVAILABLE as exc:
            log.warning(
                "could not queue the delete of a failed create (the reconciler will): %s",
                exc,
                extra=fields(connection_id=str(cmd.connection_id)),
            )

    async def _untrack(self, cmd: DeleteSession) -> None:
        """The delete is done (or no longer wanted): stop tracking it for re-drives."""
        if self.fence.pool is None:
            return
        try:
            await untrack_delete(self.fence.pool, cmd.session_name)
        except db.UNAVAILABLE as exc:
            # The watchdog re-drives it later; the delete is idempotent.
            log.warning("delete done but still tracked: %s", exc)

    def _common(self, msg: Msg, cmd: Command, tag: str, attempt: int) -> _Common:
        # Unique per message and attempt: the same on a crash's redelivery republish, new for
        # a re-driven, replayed or handed-back copy (another message, another sequence).
        run = f"{msg.metadata.sequence.stream}:{attempt}"
        return {
            "event_id": uuid.uuid5(cmd.command_id, f"{tag}:{run}"),
            "connection_id": cmd.connection_id,
            "generation": cmd.generation,
            "occurred_at": datetime.now(UTC),
            "command_id": cmd.command_id,
        }

    async def _emit(self, event: Event) -> None:
        # Retried through a leader election with the same id: a copy the old leader stored is
        # dropped by the duplicate window.
        await jsretry.publish(
            self.js,
            self.names.event_subject(EVENT_SUBJECT_KIND[type(event)], event.connection_id),
            event_encoder.encode(event),
            headers={
                headers.MSG_ID: str(event.event_id),
                headers.COMMAND_ID: str(event.command_id),
                headers.CONNECTION_ID: str(event.connection_id),
            },
        )
        log.debug("emitted %s", event_type(event))

    async def _dead_letter(
        self,
        msg: Msg,
        cmd: Command | None,
        error: str,
        reason: str,
        attempt: int,
    ) -> None:
        letter = DeadLetter(
            command=cmd,
            raw=msg.data.decode(errors="replace"),
            subject=msg.subject,
            error=error,
            reason=reason,
            deliveries=attempt,
            stream_seq=msg.metadata.sequence.stream,
            failed_at=datetime.now(UTC),
        )
        # One letter per message given up on: a replay that fails again is a new letter.
        msg_id = f"dlq:{cmd.command_id if cmd else 'undecodable'}:{letter.stream_seq}"
        await jsretry.publish(
            self.js,
            self.names.dead_letter_subject,
            dead_letter_encoder.encode(letter),
            headers={headers.MSG_ID: msg_id},
        )
        self.metrics.dead_letters.labels(cmd.kind if cmd else "unknown").inc()

    @contextlib.asynccontextmanager
    async def _heartbeat(self, msg: Msg) -> AsyncIterator[None]:
        """Tell JetStream the message is still being worked on while the block runs."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(self.heartbeat_seconds)
                with contextlib.suppress(Exception):
                    await msg.in_progress()

        task = asyncio.create_task(beat())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
