"""A durable pull consumer that survives its own deletion and stops cleanly.

``fetch`` swallows the empty-fetch timeout, and after a few empty fetches in a row asks the
server whether the consumer still exists (a deleted consumer only shows up as endless timeouts),
re-creating it when it is gone. ``report_pending`` keeps the consumer's backlog gauges current
from a background task, so a scrape never waits on the server.
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry, Gauge

from zapbus import jsretry
from zapbus.bus import ensure_consumer

log = logging.getLogger("zapbus.consumer")

_EMPTY_FETCHES_BEFORE_CHECK = 5
_FETCH_GRACE_SECONDS = 2.0
PENDING_REFRESH_SECONDS = 5.0


class PendingGauges:
    """A durable consumer's backlog, labelled by consumer name (a handful of values)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.pending = Gauge(
            "zapbus_jetstream_consumer_pending_messages",
            "Messages on the stream not yet delivered to the durable consumer.",
            ["consumer"],
            registry=registry,
        )
        self.ack_pending = Gauge(
            "zapbus_jetstream_consumer_ack_pending_messages",
            "Messages delivered to the durable consumer and not yet acknowledged.",
            ["consumer"],
            registry=registry,
        )


class DurableConsumer:
    """One durable pull consumer on one stream, declared and bound on ``open``."""

    def __init__(self, js: JetStreamContext, stream: str, config: js_api.ConsumerConfig) -> None:
        self.js = js
        self.stream = stream
        self.config = config
        self._psub: JetStreamContext.PullSubscription | None = None
        self._empty = 0

    @property
    def name(self) -> str:
        assert self.config.durable_name
        return self.config.durable_name

    async def open(self) -> None:
        self._psub = await ensure_consumer(self.js, self.stream, self.config)

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Up to ``batch`` messages, or an empty list once ``timeout`` passed with none."""
        if self._psub is None:
            await self.open()
        assert self._psub is not None
        # The outer bound guards against a fetch that does not return (seen here with
        # nats-py 2.16 a few times in a hundred runs; an orphaned pull request takes the
        # messages, cf. nats-io/nats.py#933 and #986). Re-binding with a new inbox cures it.
        guard = asyncio.timeout(timeout + _FETCH_GRACE_SECONDS)
        try:
            async with guard:
                msgs = await self._psub.fetch(batch=batch, timeout=timeout)
        except TimeoutError:
            # nats-py ends an empty fetch with nats.errors.TimeoutError or, near its
            # deadline, a plain asyncio.TimeoutError: both mean "no messages". Only the
            # guard's own expiry means the fetch hung.
            if not guard.expired():
                msgs = []
            else:
                log.warning(
                    "fetch on %s hung for %.0f s; re-binding",
                    self.name,
                    timeout + _FETCH_GRACE_SECONDS,
                )
                await self.close()
                await self.open()
                msgs = []
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError):
            await asyncio.sleep(timeout)  # the client is reconnecting; try again shortly
            msgs = []
        except nats.errors.Error as exc:
            if not jsretry.is_transient(exc):
                raise
            # A leader election on a cluster: the consumer has no leader for a few seconds
            # and its pull requests are answered 503 (no responders). Not a crash: wait.
            log.info("fetch on %s: consumer not available (%r); waiting", self.name, exc)
            await asyncio.sleep(min(timeout, 0.5))
            msgs = []
        if msgs:
            self._empty = 0
            return msgs
        self._empty += 1
        if self._empty >= _EMPTY_FETCHES_BEFORE_CHECK:
            self._empty = 0
            await self._recreate_if_missing()
        return []

    async def _recreate_if_missing(self) -> None:
        try:
            await jsretry.retrying(self._info, f"consumer_info {self.name}", deadline=10.0)
        except NotFoundError:
            log.warning("consumer %s on %s is gone; re-creating it", self.name, self.stream)
            await self.close()
            await self.open()
        except Exception as exc:  # the server is unreachable: the next fetch will tell
            log.debug("consumer_info failed: %s", exc)

    async def read_from(self, seq: int) -> js_api.RawStreamMsg | None:
        """The stream's first message at or after sequence ``seq`` on the consumer's subjects,
        read from the stream itself (whoever the consumer delivered it to); None if none."""
        subject = self.config.filter_subject
        assert subject
        try:
            msg: js_api.RawStreamMsg = await jsretry.retrying(
                lambda: self.js.get_msg(self.stream, seq, subject, next=True),
                f"get_msg {self.stream}",
                deadline=10.0,
            )
        except NotFoundError:
            return None
        return msg

    async def pending(self) -> tuple[int, int]:
        """(messages not yet delivered, delivered but not acked) for the metrics."""
        info = await jsretry.retrying(self._info, f"consumer_info {self.name}", deadline=10.0)
        return int(info.num_pending or 0), int(info.num_ack_pending or 0)

    async def declared(self) -> js_api.ConsumerConfig:
        """The consumer's configuration as declared on the server (``zapbus migrate``)."""
        info = await jsretry.retrying(self._info, f"consumer_info {self.name}", deadline=10.0)
        return info.config

    async def max_ack_pending(self) -> int | None:
        """The consumer's ``max_ack_pending`` as declared on the server (None: unlimited)."""
        value = (await self.declared()).max_ack_pending
        return int(value) if value is not None and value > 0 else None

    async def _info(self) -> js_api.ConsumerInfo:
        info: js_api.ConsumerInfo = await self.js.consumer_info(self.stream, self.name)
        return info

    async def report_pending(
        self, gauges: PendingGauges, every: float = PENDING_REFRESH_SECONDS
    ) -> None:
        """Refresh ``gauges`` from ``consumer_info`` every ``every`` seconds, until cancelled.

        Run it as a task next to the fetch loop: prometheus-client collectors are synchronous,
        so asking the server at scrape time is not an option. While the server does not
        answer, the gauges keep their last values (``zapbus_nats_connected`` tells why).
        """
        while True:
            try:
                pending, ack_pending = await self.pending()
            except Exception as exc:  # a metric never stops the service; try again later
                log.debug("consumer_info for %s failed: %r", self.name, exc)
            else:
                gauges.pending.labels(self.name).set(pending)
                gauges.ack_pending.labels(self.name).set(ack_pending)
            await asyncio.sleep(every)

    async def close(self) -> None:
        """Unsubscribe (without it, ``drain`` after an empty fetch hangs for 30 s)."""
        if self._psub is not None:
            try:
                await self._psub.unsubscribe()
            except Exception as exc:
                log.debug("unsubscribe failed: %s", exc)
            self._psub = None
