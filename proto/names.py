"""Every subject, stream and consumer name, built from one namespace.

Production uses the namespace ``zapbus``; tests pass their own (``t1a2b3c4d``) so that
they never see each other's streams. Nothing outside this module spells a subject.
"""

from __future__ import annotations

import re
import uuid
import zlib

import msgspec

_NAMESPACE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class Names(msgspec.Struct, frozen=True, kw_only=True):
    """Names of the zapbus streams, subjects and durable consumers in one namespace."""

    namespace: str = "zapbus"
    # Events are split by connection into this many partitions, each projected by one
    # projector at a time, so a connection's events are applied in order (1: no split).
    event_partitions: int = 1

    def __post_init__(self) -> None:
        if not _NAMESPACE.match(self.namespace):
            raise ValueError(
                f"namespace {self.namespace!r} must match {_NAMESPACE.pattern} "
                "(it becomes part of subjects and stream names)"
            )
        if not 1 <= self.event_partitions <= 64:
            raise ValueError(
                f"event_partitions must be within [1, 64], got {self.event_partitions}"
            )

    # -- commands: a work queue, one message per command, removed once acked --
    @property
    def commands_stream(self) -> str:
        return f"{self.namespace.upper()}_SESSION_CMDS"

    @property
    def commands_subjects(self) -> str:
        return f"{self.namespace}.cmd.session.>"

    def command_subject(self, kind: str) -> str:
        """Subject of one command kind, e.g. ``zapbus.cmd.session.create``."""
        return f"{self.namespace}.cmd.session.{kind}"

    @property
    def worker_consumer(self) -> str:
        return "session_worker"

    # -- events: what happened to a connection, kept for replay and live updates --
    @property
    def events_stream(self) -> str:
        return f"{self.namespace.upper()}_SESSION_EVENTS"

    @property
    def events_subjects(self) -> str:
        return f"{self.namespace}.evt.session.>"

    def event_partition(self, connection_id: uuid.UUID) -> int:
        """The partition of a connection's events (stable: crc32 of the id's bytes)."""
        return zlib.crc32(connection_id.bytes) % self.event_partitions

    def event_subject(self, kind: str, connection_id: uuid.UUID) -> str:
        """Subject of one event of a connection, e.g. ``zapbus.evt.session.qr`` or, with
        partitions, ``zapbus.evt.session.p3.qr``."""
        if self.event_partitions == 1:
            return f"{self.namespace}.evt.session.{kind}"
        return f"{self.namespace}.evt.session.p{self.event_partition(connection_id)}.{kind}"

    def partition_subjects(self, partition: int) -> str:
        """What the projector of one partition consumes."""
        if self.event_partitions == 1:
            return self.events_subjects
        return f"{self.namespace}.evt.session.p{partition}.>"

    def projector_consumer_of(self, partition: int) -> str:
        """Durable consumer of one partition (``projector`` when there is one)."""
        return "projector" if self.event_partitions == 1 else f"projector_p{partition}"

    @property
    def projector_consumer(self) -> str:
        return self.projector_consumer_of(0)

    # -- dead letters: commands that exhausted their attempts or failed for good --
    @property
    def dead_letter_stream(self) -> str:
        return f"{self.namespace.upper()}_SESSION_DLQ"

    @property
    def dead_letter_subject(self) -> str:
        return f"{self.namespace}.dlq.session"

    # -- advisories: JetStream's notice that a command exhausted the worker's max_deliver --
    @property
    def advisories_stream(self) -> str:
        return f"{self.namespace.upper()}_CMD_ADVISORIES"

    @property
    def max_deliveries_subject(self) -> str:
        """What the server publishes when a command reached the worker consumer's max_deliver
        (payload: ``stream_seq``, ``deliveries``); the advisories stream captures it."""
        return (
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES."
            f"{self.commands_stream}.{self.worker_consumer}"
        )

    @property
    def dead_letterer_consumer(self) -> str:
        return "dead_letterer"

    # -- changes: a snapshot per applied transition, for live updates (SSE) --
    @property
    def changes_stream(self) -> str:
        return f"{self.namespace.upper()}_CONNECTION_CHANGES"

    @property
    def changes_subjects(self) -> str:
        return f"{self.namespace}.chg.>"

    def change_subject(self, connection_id: object) -> str:
        """Subject of one connection's changes, e.g. ``zapbus.chg.<uuid>``."""
        return f"{self.namespace}.chg.{connection_id}"

    @property
    def notifier_consumer(self) -> str:
        """The notifier's durable consumer of the changes stream (webhooks to tenants)."""
        return "notifier"

    def stream_of(self, subject: str) -> str | None:
        """The zapbus stream that stores ``subject``; None for a subject of no stream. An
        atomic batch holds one stream's messages, so a publisher of several splits by this."""
        if subject in (self.dead_letter_subject, self.max_deliveries_subject):
            return (
                self.dead_letter_stream
                if subject == self.dead_letter_subject
                else self.advisories_stream
            )
        for pattern, stream in (
            (self.commands_subjects, self.commands_stream),
            (self.events_subjects, self.events_stream),
            (self.changes_subjects, self.changes_stream),
        ):
            if subject.startswith(pattern.removesuffix(">")):
                return stream
        return None

    @property
    def all_streams(self) -> tuple[str, ...]:
        return (
            self.commands_stream,
            self.events_stream,
            self.dead_letter_stream,
            self.changes_stream,
            self.advisories_stream,
        )
