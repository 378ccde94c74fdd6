"""Dead letters: commands the worker gave up on, for an operator to see and replay.

``replay`` resets the connection to ``pending`` (same generation) and queues the command again
through the outbox, in one Postgres transaction, then removes the dead letter from the stream.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from proto.commands import CreateSession, DeadLetter, dead_letter_decoder
from proto.names import Names
from proto.states import Status
from zapbus.outbox import insert_outbox


class Letter(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    letter: DeadLetter


async def list_letters(js: JetStreamContext, names: Names, limit: int = 100) -> list[Letter]:
    """The oldest ``limit`` dead letters still on the stream."""
    info = await js.stream_info(names.dead_letter_stream)
    letters: list[Letter] = []
    seq = info.state.first_seq
    while seq and seq <= info.state.last_seq and len(letters) < limit:
        try:
            msg = await js.get_msg(names.dead_letter_stream, seq)
        except NotFoundError:
            seq += 1
            continue
        assert msg.data is not None
        letters.append(Letter(seq=seq, letter=dead_letter_decoder.decode(msg.data)))
        seq += 1
    return letters


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
        await conn.execute(
            "INSERT INTO connection_events (event_id, connection_id, generation, event_type,"
            " from_status, to_status, applied, reason, command_id, occurred_at)"
            " VALUES ($1, $2, $3, 'dlq.replayed', $4, $5, true, $6, $7, $8)",
            uuid.uuid4(),
            cmd.connection_id,
            cmd.generation,
            row["status"],
            Status.PENDING.value if isinstance(cmd, CreateSession) else row["status"],
            f"dead letter {seq} replayed by an operator",
            cmd.command_id,
            datetime.now(UTC),
        )
    await js.delete_msg(names.dead_letter_stream, seq)
    return letter
