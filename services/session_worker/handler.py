"""Carries out one command against the Baileys server and maps the result to a JetStream action.

success -> event + ``ack()``; retryable error -> event + ``nak(delay)``; permanent error or the
last attempt -> dead letter + failed event + ``term()``. During the (slow) call the message is
kept alive with ``in_progress()``. Events get ids derived from the command id and attempt, so a
crash and redelivery republishes the same ids and nothing is counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TypedDict

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from proto import headers
from proto.commands import (
    CreateSession,
    DeadLetter,
    DeleteSession,
    command_decoder,
    dead_letter_encoder,
)
from proto.events import (
    EVENT_SUBJECT_KIND,
    CreateFailed,
    CreateRetrying,
    CreateStarted,
    Event,
    SessionCreated,
    SessionDeleted,
    event_encoder,
    event_type,
)
from proto.names import Names
from services.session_worker.baileys_client import BaileysClient, CreateSessionRequest
from services.session_worker.breaker import Breaker
from services.session_worker.errors import BaileysError, PermanentError, RetryableError
from services.session_worker.fence import Fence
from services.session_worker.metrics import WorkerMetrics
from services.session_worker.retry import RetryPolicy
from zapbus.logs import fields
from zapbus.tokens import webhook_url

log = logging.getLogger("zapbus.session_worker")


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
        baileys: BaileysClient,
        retry: RetryPolicy,
        metrics: WorkerMetrics,
        webhook_base_url: str,
        webhook_secret: str,
        heartbeat_seconds: float,
        fence: Fence,
        breaker: Breaker,
        max_concurrent_creates: int,
    ) -> None:
        self.js = js
        self.names = names
        self.baileys = baileys
        self.retry = retry
        self.metrics = metrics
        self.webhook_base_url = webhook_base_url
        self.webhook_secret = webhook_secret
        self.heartbeat_seconds = heartbeat_seconds
        self.fence = fence
        self.breaker = breaker
        self.create_slots = asyncio.Semaphore(max_concurrent_creates)

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
        attempt = msg.metadata.num_delivered or 1
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
            match cmd:
                case CreateSession():
                    outcome = await self._create(msg, cmd, attempt)
                case DeleteSession():
                    outcome = await self._delete(msg, cmd, attempt)
        except asyncio.CancelledError:
            outcome = "interrupted"
            with contextlib.suppress(Exception):
                await asyncio.shield(msg.nak())
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
                    delivered=attempt,
                    ms=round((time.perf_counter() - start) * 1000, 1),
                ),
            )

    async def _create(self, msg: Msg, cmd: CreateSession, attempt: int) -> str:
        if await self.fence.is_current(cmd) is False:
            await msg.ack()  # superseded by a recreate or a delete: nothing to create
            return "fenced"
        common = self._common(cmd, "create.started", attempt)
        await self._emit(CreateStarted(**common, attempt=attempt))
        try:
            async with self._heartbeat(msg):
                await self.breaker.wait_closed()
                async with self.create_slots:
                    already = await self._create_once(cmd, attempt)
        except BaileysError as exc:
            self.breaker.record(exc.server_down)
            return await self._on_error(msg, cmd, attempt, exc)
        self.breaker.record(server_down=False)
        if await self.fence.is_current(cmd, fresh=True) is False:
            # Recreated or deleted while we were creating: remove what we just made, so the
            # Baileys server never keeps two sessions for one connection.
            with contextlib.suppress(BaileysError):
                await self.baileys.delete_session(cmd.session_name)
            await msg.ack()
            return "fenced"
        common = self._common(cmd, "create.succeeded", attempt)
        await self._emit(SessionCreated(**common, attempt=attempt, already_existed=already))
        await msg.ack()
        return "succeeded"

    async def _create_once(self, cmd: CreateSession, attempt: int) -> bool:
        """Create the session unless an earlier attempt already did; True if it existed."""
        start = time.perf_counter()
        op, result = "create", "ok"
        try:
            if attempt > 1:
                # The last try may have timed out after the server created it: ask first.
                op = "get"
                if await self.baileys.session_exists(cmd.session_name):
                    return True
                op = "create"
            url = webhook_url(
                self.webhook_base_url, self.webhook_secret, cmd.connection_id, cmd.generation
            )
            created = await self.baileys.create_session(
                CreateSessionRequest(name=cmd.session_name, webhook_url=url)
            )
            return created.already_existed
        except BaileysError:
            result = "error"
            raise
        finally:
            self.metrics.baileys_seconds.labels(op, result).observe(time.perf_counter() - start)

    async def _delete(self, msg: Msg, cmd: DeleteSession, attempt: int) -> str:
        start = time.perf_counter()
        try:
            async with self._heartbeat(msg):
                await self.breaker.wait_closed()
                await self.baileys.delete_session(cmd.session_name)
        except BaileysError as exc:
            self.breaker.record(exc.server_down)
            self.metrics.baileys_seconds.labels("delete", "error").observe(
                time.perf_counter() - start
            )
            return await self._on_error(msg, cmd, attempt, exc)
        self.metrics.baileys_seconds.labels("delete", "ok").observe(time.perf_counter() - start)
        await self._emit(SessionDeleted(**self._common(cmd, "session.deleted", attempt)))
        await msg.ack()
        return "succeeded"

    async def _on_error(
        self, msg: Msg, cmd: CreateSession | DeleteSession, attempt: int, exc: BaileysError
    ) -> str:
        permanent = isinstance(exc, PermanentError)
        if permanent or self.retry.is_last(attempt):
            why = "permanent" if permanent else "exhausted"
            reason = exc.reason if permanent else f"gave up after {attempt} attempts: {exc.reason}"
            await self._dead_letter(msg, cmd, reason, why, attempt)
            if isinstance(cmd, CreateSession):
                common = self._common(cmd, "create.failed", attempt)
                await self._emit(CreateFailed(**common, attempt=attempt, reason=reason))
            await msg.term()
            self.metrics.failures.labels(cmd.kind, why).inc()
            return "failed"
        assert isinstance(exc, RetryableError)
        delay = self.retry.delay(attempt)
        if isinstance(cmd, CreateSession):
            common = self._common(cmd, "create.retrying", attempt)
            await self._emit(
                CreateRetrying(
                    **common, attempt=attempt, reason=exc.reason, retry_in_seconds=round(delay, 2)
                )
            )
        await msg.nak(delay=delay)
        return "retried"

    def _common(self, cmd: CreateSession | DeleteSession, tag: str, attempt: int) -> _Common:
        return {
            "event_id": uuid.uuid5(cmd.command_id, f"{tag}:{attempt}"),
            "connection_id": cmd.connection_id,
            "generation": cmd.generation,
            "occurred_at": datetime.now(UTC),
            "command_id": cmd.command_id,
        }

    async def _emit(self, event: Event) -> None:
        await self.js.publish(
            self.names.event_subject(EVENT_SUBJECT_KIND[type(event)]),
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
        cmd: CreateSession | DeleteSession | None,
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
        msg_id = f"dlq:{cmd.command_id}" if cmd else f"dlq:seq:{letter.stream_seq}"
        await self.js.publish(
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
