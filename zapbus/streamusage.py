"""How full each zapbus stream is, against its limits, for the alerts (deploy/prometheus).

A full stream refuses new messages (commands, events, dead letters: ``discard: new``) or drops
its oldest (changes), so the alerts fire well before: ``ZapbusStreamNearLimit`` at 80 % and
``ZapbusStreamFull`` at 95 %. The projector runs one ``StreamUsage`` (any replica may: every
one reports the same values). Collectors are synchronous, so a background loop asks the server
(``stream_info``) every ``every`` seconds; while NATS does not answer, the last values stay.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Gauge

from proto.names import Names
from zapbus.supervisor import Stoppable

log = logging.getLogger("zapbus.streamusage")


class StreamUsage(Stoppable):
    """A runner (zapbus.supervisor) refreshing the stream gauges."""

    def __init__(
        self, js: JetStreamContext, names: Names, registry: CollectorRegistry, every: float = 15.0
    ) -> None:
        self.js = js
        self.names = names
        self.every = every
        self.bytes = Gauge(
            "zapbus_jetstream_stream_bytes",
            "Bytes stored in the stream.",
            ["stream"],
            registry=registry,
        )
        self.messages = Gauge(
            "zapbus_jetstream_stream_messages",
            "Messages stored in the stream.",
            ["stream"],
            registry=registry,
        )
        self.max_bytes = Gauge(
            "zapbus_jetstream_stream_max_bytes",
            "The stream's max_bytes limit (-1: none).",
            ["stream"],
            registry=registry,
        )
        self.max_messages = Gauge(
            "zapbus_jetstream_stream_max_messages",
            "The stream's max_msgs limit (-1: none).",
            ["stream"],
            registry=registry,
        )
        super().__init__()

    async def refresh(self) -> None:
        for stream in self.names.all_streams:
            try:
                info = await self.js.stream_info(stream)
            except Exception as exc:  # a metric never stops the service; try again later
                log.debug("stream_info for %s failed: %r", stream, exc)
                continue
            self.bytes.labels(stream).set(info.state.bytes or 0)
            self.messages.labels(stream).set(info.state.messages or 0)
            limit = info.config.max_bytes
            self.max_bytes.labels(stream).set(-1 if limit is None else limit)
            limit = info.config.max_msgs
            self.max_messages.labels(stream).set(-1 if limit is None else limit)

    async def run(self) -> None:
        while not self.stopping:
            await self.refresh()
            await self.pause(self.every)
