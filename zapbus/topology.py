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

import dataclasses
import logging
from functools import partial

from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

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
        # one ack per batch (its last event) acknowledges the batch: a projector takes events
        # in order and commits a batch whole (a consumer declared with explicit acks is
        # re-created after its ack floor: declare_consumer)
        ack_policy=js_api.AckPolicy.ALL,
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
        note = await declare_consumer(js, stream, config)
        done.append(f"consumer {config.durable_name} on {stream}{note}")
    log.info("declared %s", ", ".join(done))
    return done


async def declare_consumer(js: JetStreamContext, stream: str, config: js_api.ConsumerConfig) -> str:
    """Create the consumer, or update it in place (retried across a leader election).

    Its start (deliver policy, start sequence) is kept as it was: the server refuses to change
    it. So is its ack policy, unless ``config`` changes it (the projector's went from explicit
    to all, one ack per batch): the server cannot update that either, so the consumer is
    deleted and created again, starting right after its ack floor. Events delivered and not
    yet acknowledged are delivered again (the projector skips the ones it stored); the ones
    acknowledged are not replayed. Returns a note for the operator ("" when nothing special).
    """
    durable = config.durable_name
    assert durable
    try:
        info = await jsretry.retrying(
            partial(js.consumer_info, stream, durable), f"consumer_info {durable}"
        )
    except NotFoundError:
        info = None
    note = ""
    if info is not None and info.config.ack_policy == config.ack_policy:
        config = dataclasses.replace(
            config,
            deliver_policy=info.config.deliver_policy,
            opt_start_seq=info.config.opt_start_seq,
            opt_start_time=info.config.opt_start_time,
        )
    elif info is not None:
        start = (info.ack_floor.stream_seq if info.ack_floor else 0) + 1
        log.warning(
            "consumer %s on %s: ack policy %s -> %s cannot be updated; re-creating it from"
            " stream sequence %d (after its ack floor)",
            durable,
            stream,
            info.config.ack_policy,
            config.ack_policy,
            start,
        )
        await jsretry.retrying(
            partial(js.delete_consumer, stream, durable), f"delete_consumer {durable}"
        )
        config = dataclasses.replace(
            config,
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            opt_start_time=None,
        )
        note = f" (re-created from sequence {start}: ack policy changed)"
    await jsretry.retrying(partial(js.add_consumer, stream, config), f"add_consumer {durable}")
    return note


async def declare_with(settings: Settings) -> list[str]:
    """``declare`` over a connection of its own."""
    nc = await bus.connect(settings.nats_url, "zapbus-migrate")
    try:
        return await declare(nc.jetstream(), settings)
    finally:
        await nc.close()
