"""Every JetStream stream and durable consumer zapbus uses, declared in one place.

``zapbus migrate`` calls ``declare`` (after the SQL migrations), and so do ``make run`` and the
test and benchmark set-ups. Services never declare or rewrite streams: at start they check that
the streams exist and stop with a message naming ``zapbus migrate`` if one does not
(``bus.require_streams``); they bind to their consumer as declared (``bus.ensure_consumer``,
which creates it only if it is missing).

Each consumer's configuration is defined next to the service that consumes it (it follows that
service's settings: the worker's ``ack_wait``, attempts and concurrency, the projector's batch
and partitions), so run ``zapbus migrate`` with the services' settings.
"""

from __future__ import annotations

import logging
from functools import partial

from nats.js import JetStreamContext
from nats.js import api as js_api

from zapbus import bus, jsretry
from zapbus.config import Settings

log = logging.getLogger("zapbus.topology")


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
    # The services' modules import the runtime, which imports this package: import late.
    from services.notifier.app import consumer_config as notifier_config
    from services.projector.app import consumer_config as projector_config
    from services.session_worker.app import consumer_config as worker_config

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
    done = [
        f"stream {c.name} (R{settings.stream_replicas})"
        for c in bus.stream_configs(settings.names, settings.stream_replicas)
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
