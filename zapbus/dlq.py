"""Dead letters: commands the worker gave up on, for an operator to see and replay.

``replay`` queues the command again through the outbox, in one Postgres transaction, then
removes the dead letter from the stream. A create resets its connection to ``pending`` (same
generation) and is refused once the connection moved on; a delete can always be replayed (the
worker's fence skips it if the session is wanted again). A replayed command is a new message,
so if it fails again it is dead-lettered again, under a new letter.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from proto.commands import Command, CreateSession, DeadLetter, DeleteSession, dead_letter_decoder
from proto.names import Names
from proto.states import Status
from zapbus.outbox import insert_outbox


class Letter(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    letter: DeadLetter


async def iter_letters(js: JetStreamContext, names: Names) -> AsyncIterator[Letter]:
    """Every dead letter still on the stream, oldest first (replayed ones are gone)."""
    info = await js.stream_info(names.dead_letter_stream)
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
        if isinstance(cmd, DeleteSession):
            # Removing a session is always safe to try again; the worker's fence skips it if
            # the row's current generation wants that session after all.
            await insert_outbox(conn, names, cmd, msg_id=f"{cmd.command_id}:replay:{seq}")
            if row is not None:
                await _record(conn, cmd, seq, row["status"], row["status"])
            await js.delete_msg(names.dead_letter_stream, seq)
            return letter
        if row is None or row["generation"] != cmd.generation:
            raise ReplayError("the connection moved to another generation or is gone")
        if row["status"] == Status.DELETED:
            raise ReplayError("the connection was deleted")
        if isinstance(cmd, CreateSession):
            await conn.execute(
                "UPDATE connections SET status = $2, status_reason = NULL, attempts = 0,"
                " redrives = 0, updated_at = now(), status_changed_at = now() WHERE id = $1",
                cmd.connection_id,
                Status.PENDING.value,
            )
        await insert_outbox(conn, names, cmd, msg_id=f"{cmd.command_id}:replay:{seq}")
        await _record(conn, cmd, seq, row["status"], Status.PENDING.value)
    await js.delete_msg(names.dead_letter_stream, seq)
    return letter


async def _record(
    conn: asyncpg.Connection, cmd: Command, seq: int, from_status: str, to_status: str
) -> None:
    await conn.execute(
        "INSERT INTO connection_events (event_id, connection_id, generation, event_type,"
        " from_status, to_status, applied, reason, command_id, occurred_at)"
        " VALUES ($1, $2, $3, 'dlq.replayed', $4, $5, true, $6, $7, $8)",
        uuid.uuid4(),
        cmd.connection_id,
        cmd.generation,
        from_status,
        to_status,
        f"dead letter {seq} ({cmd.kind}) replayed by an operator",
        cmd.command_id,
        datetime.now(UTC),
    )
