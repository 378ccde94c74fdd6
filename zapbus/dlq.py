"""Dead letters: commands the worker gave up on, for an operator to see and replay.

``replay`` queues the command again through the outbox, in one Postgres transaction, then
removes the dead letter from the stream. A create resets its connection to ``pending`` (same
generation; through the state writer, so the change is queued and the old reason and reason
code are cleared) and is refused once the connection moved on; a delete can always be replayed (the
worker's fence skips it if the session is wanted again). A replayed command is a new message,
so if it fails again it is dead-lettered again, under a new letter.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import partial

import asyncpg
import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import Counter

from proto import headers
from proto.commands import (
    Command,
    CreateSession,
    DeadLetter,
    DeleteSession,
    command_decoder,
    dead_letter_decoder,
    dead_letter_encoder,
)
from proto.names import Names
from zapbus import jsretry
from zapbus.connection.machine import Forced
from zapbus.connection.states import Status
from zapbus.connection.writer import record, transition
from zapbus.consumer import DurableConsumer
from zapbus.logs import fields
from zapbus.outbox import insert_outbox
from zapbus.supervisor import Stoppable

log = logging.getLogger("zapbus.dlq")


class Letter(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    letter: DeadLetter


async def iter_letters(js: JetStreamContext, names: Names) -> AsyncIterator[Letter]:
    """Every dead letter still on the stream, oldest first (replayed ones are gone)."""
    stream = names.dead_letter_stream
    info = await jsretry.retrying(partial(js.stream_info, stream), f"stream_info {stream}")
    seq = info.state.first_seq
    while seq and seq <= info.state.last_seq:
        try:
            # next_by_subj: the first message at or after seq, skipping deleted gaps at once
            msg = await js.get_msg(
                names.dead_letter_stream, seq, next=True, subject=names.dead_letter_subject
            )
        except NotFoundError:
            return
        assert msg.data is not None and msg.seq is not None
        yield Letter(seq=msg.seq, letter=dead_letter_decoder.decode(msg.data))
        seq = msg.seq + 1


async def list_letters(js: JetStreamContext, names: Names) -> list[Letter]:
    """Every dead letter still on the stream, oldest first."""
    return [letter async for letter in iter_letters(js, names)]


class ReplayError(Exception):
    """The dead letter cannot be replayed (with the reason)."""


async def replay(js: JetStreamContext, pool: asyncpg.Pool, names: Names, seq: int) -> DeadLetter:
    try:
        msg = await js.get_msg(names.dead_letter_stream, seq)
    except NotFoundError:
        raise ReplayError(f"no dead letter with sequence {seq}") from None
    assert msg.data is not None
    letter = dead_letter_decoder.decode(msg.data)
    cmd = letter.command
    if cmd is None:
        raise ReplayError("the command could not be decoded; nothing to replay")
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT generation, status FROM connections WHERE id = $1 FOR UPDATE",
            cmd.connection_id,
        )
        msg_id = f"{cmd.command_id}:replay:{seq}"
        note = f"dead letter {seq} ({cmd.kind}) replayed by an operator"
        if isinstance(cmd, DeleteSession):
            # Removing a session is always safe to try again; the worker's fence skips it if
            # the row's current generation wants that session after all.
            await insert_outbox(conn, names, cmd, msg_id=msg_id)
            if row is not None:
                await _record(conn, cmd, note, row["status"])
            await js.delete_msg(names.dead_letter_stream, seq)
            return letter
        if row is None or row["generation"] != cmd.generation:
            raise ReplayError("the connection moved to another generation or is gone")
        if row["status"] == Status.DELETED:
            raise ReplayError("the connection was deleted")
        await insert_outbox(conn, names, cmd, msg_id=msg_id)
        if isinstance(cmd, CreateSession):
            # the create runs again from the start: pending, its old reason (and code) gone
            await transition(
                conn,
                names,
                cmd.connection_id,
                Forced.RERUN,
                cause="dlq.replayed",
                changes={"attempts": 0, "redrives": 0},
                note=note,
                command_id=cmd.command_id,
            )
        else:
            await _record(conn, cmd, note, row["status"])
    await js.delete_msg(names.dead_letter_stream, seq)
    return letter


async def _record(conn: asyncpg.Connection, cmd: Command, note: str, status: str) -> None:
    """History of a replay that moves no state."""
    await record(
        conn,
        cmd.connection_id,
        cmd.generation,
        "dlq.replayed",
        from_status=status,
        to_status=status,
        applied=True,
        reason=note,
        command_id=cmd.command_id,
    )


# -- commands that exhausted the worker consumer's max_deliver ---------------------------------
#
# The worker dead-letters a command on its last attempt itself. A command whose deliveries all
# ended without an answer (the worker crashed or hung on it each time, or the worker's own
# dead-lettering failed) reaches the consumer's ``max_deliver`` and, on a work-queue stream,
# stays stored and is never delivered again. JetStream publishes an advisory then; the
# advisories stream captures it (so it waits while no one listens), and ``MaxDeliveries`` turns
# each into a dead letter (reason ``max_deliver``) and removes the stuck message. The row of a
# create is left to the watchdog, which re-drives it and finally fails it with ``timeout``.


class MaxDeliveryAdvisory(msgspec.Struct, kw_only=True):
    """``io.nats.jetstream.advisory.v1.max_deliver`` (the fields zapbus uses)."""

    stream: str
    consumer: str
    stream_seq: int
    deliveries: int


_advisory_decoder = msgspec.json.Decoder(MaxDeliveryAdvisory)


async def dead_letter_stuck(
    js: JetStreamContext, names: Names, advisory: MaxDeliveryAdvisory
) -> DeadLetter | None:
    """Dead-letter the command an advisory names and delete it from the work queue; None if it
    is gone already (acked after all, or handled by another replica)."""
    try:
        msg = await js.get_msg(advisory.stream, advisory.stream_seq)
    except NotFoundError:
        return None
    assert msg.data is not None
    raw = msg.data.decode(errors="replace")
    try:
        cmd: Command | None = command_decoder.decode(msg.data)
    except msgspec.DecodeError:
        cmd = None
    letter = DeadLetter(
        command=cmd,
        raw=raw,
        subject=msg.subject or "",
        error=(
            f"no delivery of {advisory.deliveries} ended with an answer (the worker crashed"
            " or hung on each, or could not dead-letter it); removed from the work queue"
        ),
        reason="max_deliver",
        deliveries=advisory.deliveries,
        stream_seq=advisory.stream_seq,
        failed_at=datetime.now(UTC),
    )
    # The worker's own id scheme: if it dead-lettered this message just before it died, the
    # duplicate window drops this second letter.
    msg_id = f"dlq:{cmd.command_id if cmd else 'undecodable'}:{advisory.stream_seq}"
    await jsretry.publish(
        js,
        names.dead_letter_subject,
        dead_letter_encoder.encode(letter),
        headers={headers.MSG_ID: msg_id},
        timeout=5.0,
    )
    try:
        await js.delete_msg(advisory.stream, advisory.stream_seq)
    except NotFoundError:
        pass  # another replica removed it
    return letter


class MaxDeliveries(Stoppable):
    """A runner (zapbus.supervisor) consuming the max-deliveries advisories of the commands."""

    def __init__(
        self,
        consumer: DurableConsumer,
        js: JetStreamContext,
        names: Names,
        dead_letters: Counter,
        fetch_timeout: float = 1.0,
    ) -> None:
        self.consumer = consumer
        self.js = js
        self.names = names
        self.dead_letters = dead_letters
        self.fetch_timeout = fetch_timeout
        super().__init__()

    async def run(self) -> None:
        await self.consumer.open()
        try:
            while not self.stopping:
                for msg in await self.consumer.fetch(16, self.fetch_timeout):
                    await self.handle(msg)
        finally:
            await self.consumer.close()

    async def handle(self, msg: Msg) -> None:
        try:
            advisory = _advisory_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            log.error("undecodable max-deliveries advisory dropped: %s", exc)
            await msg.term()
            return
        if advisory.stream != self.names.commands_stream:
            await msg.ack()
            return
        try:
            letter = await dead_letter_stuck(self.js, self.names, advisory)
        except Exception as exc:  # NATS busy or down: the advisory comes back later
            log.warning("could not dead-letter stuck command %d: %r", advisory.stream_seq, exc)
            await msg.nak(delay=5.0)
            return
        await msg.ack()
        if letter is None:
            return
        kind = letter.command.kind if letter.command else "unknown"
        self.dead_letters.labels(kind).inc()
        log.error(
            "command dead-lettered after max_deliver",
            extra=fields(
                command=kind,
                connection_id=str(letter.command.connection_id) if letter.command else None,
                command_id=str(letter.command.command_id) if letter.command else None,
                seq=advisory.stream_seq,
                delivered=advisory.deliveries,
            ),
        )
