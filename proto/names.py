"""Every subject, stream and consumer name, built from one namespace.

Production uses the namespace ``zapbus``; tests pass their own (``t1a2b3c4d``) so that
they never see each other's streams. Nothing outside this module spells a subject.
"""

from __future__ import annotations

import re

import msgspec

_NAMESPACE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class Names(msgspec.Struct, frozen=True, kw_only=True):
    """Names of the zapbus streams, subjects and durable consumers in one namespace."""

    namespace: str = "zapbus"

    def __post_init__(self) -> None:
        if not _NAMESPACE.match(self.namespace):
            raise ValueError(
                f"namespace {self.namespace!r} must match {_NAMESPACE.pattern} "
                "(it becomes part of subjects and stream names)"
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

    def event_subject(self, kind: str) -> str:
        """Subject of one event kind, e.g. ``zapbus.evt.session.qr``."""
        return f"{self.namespace}.evt.session.{kind}"

    @property
    def projector_consumer(self) -> str:
        return "projector"

    # -- dead letters: commands that exhausted their attempts or failed for good --
    @property
    def dead_letter_stream(self) -> str:
        return f"{self.namespace.upper()}_SESSION_DLQ"

    @property
    def dead_letter_subject(self) -> str:
        return f"{self.namespace}.dlq.session"

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
    def all_streams(self) -> tuple[str, ...]:
        return (
            self.commands_stream,
            self.events_stream,
            self.dead_letter_stream,
            self.changes_stream,
        )
