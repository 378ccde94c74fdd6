"""What the session worker publishes: events, commands it queues, dead letters, handed-back
copies. Subjects and message ids are chosen here, so flows never build a JetStream call."""

from __future__ import annotations

import logging

from nats.aio.msg import Msg

from proto import headers
from proto.commands import Command, DeadLetter, command_encoder, dead_letter_encoder
from proto.events import EVENT_SUBJECT_KIND, Event, event_encoder, event_type
from proto.names import Names
from zapbus import jsretry

log = logging.getLogger("zapbus.session_worker")


class FlowPublisher:
    def __init__(self, js: jsretry.Publisher, names: Names) -> None:
        """``js``: a batchpub.GroupCommit in the service (a JetStreamContext does too)."""
        self.js = js
        self.names = names

    async def event(self, event: Event) -> None:
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

    async def command(self, cmd: Command, msg_id: str) -> None:
        """Queue a command for the workers (``msg_id``: asked once however often this runs)."""
        await jsretry.publish(
            self.js,
            self.names.command_subject(cmd.kind),
            command_encoder.encode(cmd),
            headers={
                headers.MSG_ID: msg_id,
                headers.COMMAND_ID: str(cmd.command_id),
                headers.CONNECTION_ID: str(cmd.connection_id),
            },
        )

    async def dead_letter(self, letter: DeadLetter) -> None:
        # One letter per message given up on: a replay that fails again is a new letter.
        cmd = letter.command
        msg_id = f"dlq:{cmd.command_id if cmd else 'undecodable'}:{letter.stream_seq}"
        await jsretry.publish(
            self.js,
            self.names.dead_letter_subject,
            dead_letter_encoder.encode(letter),
            headers={headers.MSG_ID: msg_id},
        )

    async def copy(self, msg: Msg, cmd: Command, attempts_used: int) -> None:
        """Queue a copy of ``msg`` that carries the attempts already spent (a hand-back)."""
        hdrs = {
            headers.MSG_ID: f"{cmd.command_id}:resume:{msg.metadata.sequence.stream}",
            headers.COMMAND_ID: str(cmd.command_id),
            headers.CONNECTION_ID: str(cmd.connection_id),
            headers.ATTEMPTS_USED: str(attempts_used),
        }
        await self.js.publish(msg.subject, msg.data, headers=hdrs, timeout=2.0)
