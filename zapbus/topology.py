"""Every JetStream stream and durable consumer zapbus uses, declared in one place.

``zapbus migrate`` calls ``declare`` (after the SQL migrations), and so do ``make run`` and the
test and benchmark set-ups. Services never declare or rewrite streams: at start they check that
the streams exist and stop with a message naming ``zapbus migrate`` if one does not
(``bus.require_streams``); they bind to their consumer as declared (``bus.ensure_consumer``,
which creates it only if it is missing).

Every consumer's configuration is defined here, below the services that bind to it (it follows
that service's settings: the worker's ``ack_wait``, attempts and concurrency, the projector's
batch and partitions), so run ``zapbus migrate`` with the services' settings. This module
imports no service: services import it.
"""

from __future__ import annotations

import logging
from functools import partial

from nats.js import JetStreamContext
from nats.js import api as js_api

from zapbus import bus, jsretry
from zapbus.config import Settings

log = logging.getLogger("zapbus.topology")

# Short: a batch takes milliseconds (each statement is bounded by the database timeouts), and
# a partition taken over from a dead projector waits this long before projecting.
PROJECTOR_ACK_WAIT_SECONDS = 15.0

# Changes the notifier's fan-out fetches at once (and its consumer's max_ack_pending); also
# the most changes one pass reads from the stream to close a gap.
FANOUT_BATCH = 256


def worker_config(settings: Settings) -> js_api.ConsumerConfig:
    """The session workers' shared work-queue consumer of SESSION_CMDS."""
    names = settings.names
    return js_api.ConsumerConfig(
        durable_name=names.worker_consumer,
        filter_subject=names.commands_subjects,
        ack_policy=js_api.AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_seconds,
        # We handle the last attempt ourselves (dead letter + term); this is a safety net for
        # a worker that dies on every delivery of one message.
        max_deliver=settings.create_max_attempts + 3,
        max_ack_pending=settings.worker_concurrency,
    )


def projector_config(settings: Settings, partition: int = 0) -> js_api.ConsumerConfig:
    """The projector's consumer of one partition of SESSION_EVENTS."""
    names = settings.names
    return js_api.ConsumerConfig(
        durable_name=names.projector_consumer_of(partition),
        filter_subject=names.partition_subjects(partition),
        ack_policy=js_api.AckPolicy.EXPLICIT,
        deliver_policy=js_api.DeliverPolicy.ALL,
        ack_wait=PROJECTOR_ACK_WAIT_SECONDS,
        max_deliver=-1,  # a database outage must not drop events: retry until it is back
        max_ack_pending=max(1000, settings.projector_batch * 4),
    )


def notifier_config(settings: Settings) -> js_api.ConsumerConfig:
    """The notifier's durable consumer of CONNECTION_CHANGES. New changes only from its
    creation on: older ones predate the endpoints."""
    names = settings.names
    return js_api.ConsumerConfig(
        durable_name=names.notifier_consumer,
        filter_subject=names.changes_subjects,
        ack_policy=js_api.AckPolicy.EXPLICIT,
        deliver_policy=js_api.DeliverPolicy.NEW,
        # a batch is one insert; what a fan-out died holding comes back after this, and is
        # acked then (order does not wait for it: the fan-out's checkpoint in Postgres makes
        # the next one read it from the stream first, see services/notifier/fanout.py)
        ack_wait=10.0,
        max_deliver=-1,  # a database outage must not drop a change
        max_ack_pending=FANOUT_BATCH,
    )


def dead_letterer_config(settings: Settings) -> js_api.ConsumerConfig:
    """The consumer of max-deliveries advisories (zapbus/dlq.py, run by the projector)."""
    names = settings.names
    return js_api.ConsumerConfig(
        durable_name=names.dead_letterer_consumer,
        filter_subject=names.max_deliveries_subject,
        ack_policy=js_api.AckPolicy.EXPLICIT,
        ack_wait=30.0,
        max_deliver=-1,  # a NATS hiccup while dead-lettering must not lose the advisory
        max_ack_pending=100,
    )


def consumer_configs(settings: Settings) -> list[tuple[str, js_api.ConsumerConfig]]:
    """(stream, config) of every durable consumer of the deployment."""
    names = settings.names
    return [
        (names.commands_stream, worker_config(settings)),
        *(
            (names.events_stream, projector_config(settings, partition))
            for partition in range(settings.event_partitions)
        ),
        (names.advisories_stream, dead_letterer_config(settings)),
        (names.changes_stream, notifier_config(settings)),
    ]


async def declare(js: JetStreamContext, settings: Settings) -> list[str]:
    """Create or update every stream (with ZAPBUS_STREAM_REPLICAS replicas) and consumer;
    return one line per stream and consumer for the operator."""
    await bus.ensure_streams(js, settings.names, settings.stream_replicas)
    atomic = bus.supports_atomic(js)
    done = [
        f"stream {c.name} (R{settings.stream_replicas}{', atomic' if atomic else ''})"
        for c in bus.stream_configs(settings.names, settings.stream_replicas, atomic)
    ]
    for stream, config in consumer_configs(settings):
        # creates it, or updates an existing one; retried across a leader election
        await jsretry.retrying(
            partial(js.add_consumer, stream, config), f"add_consumer {config.durable_name}"
        )
        done.append(f"consumer {config.durable_name} on {stream}")
    log.info("declared %s", ", ".join(done))
    return done


async def declare_with(settings: Settings) -> list[str]:
    """``declare`` over a connection of its own."""
    nc = await bus.connect(settings.nats_url, "zapbus-migrate")
    try:
        return await declare(nc.jetstream(), settings)
    finally:
        await nc.close()
