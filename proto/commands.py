"""Commands queued on the SESSION_CMDS work queue, one per thing to do on the Baileys server.

Tagged msgspec Structs; the tag is the wire discriminator and is never reused. New fields get
defaults so that an old worker can read a new gateway's commands.
"""

from __future__ import annotations

import uuid
from datetime import datetime

import msgspec


class _SessionCommand(msgspec.Struct, frozen=True, kw_only=True):
    """What every command names: which generation of which connection, and its session."""

    command_id: uuid.UUID
    connection_id: uuid.UUID
    tenant_id: uuid.UUID
    generation: int
    session_name: str
    requested_at: datetime


class CreateSession(_SessionCommand, frozen=True, kw_only=True, tag="session.create"):
    """Create the Baileys session of one generation of a connection."""

    login: str = "qr"  # "qr" | "code"
    phone_number: str | None = None  # E.164, for code login

    @property
    def kind(self) -> str:
        return "create"


class DeleteSession(_SessionCommand, frozen=True, kw_only=True, tag="session.delete"):
    """Delete the Baileys session of one generation (on delete or recreate)."""

    phone_number: str | None = None  # servers keyed by phone (fazer) need it
    # the Baileys server holding it; None: where the generation was placed
    server: str | None = None

    @property
    def kind(self) -> str:
        return "delete"


class RequestPairingCode(_SessionCommand, frozen=True, kw_only=True, tag="session.pairing_code"):
    """Ask the server for a pairing code for ``phone_number`` (code login)."""

    phone_number: str

    @property
    def kind(self) -> str:
        return "pairing_code"


Command = CreateSession | DeleteSession | RequestPairingCode

command_encoder = msgspec.json.Encoder()
command_decoder = msgspec.json.Decoder(Command)


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A command given up on, kept on the dead-letter stream for an operator to inspect/replay."""

    command: Command | None  # None when the command could not be decoded
    raw: str  # the original message body, as received
    subject: str
    error: str
    reason: str  # permanent | exhausted | undecodable
    deliveries: int
    stream_seq: int
    failed_at: datetime


dead_letter_encoder = msgspec.json.Encoder()
dead_letter_decoder = msgspec.json.Decoder(DeadLetter)
