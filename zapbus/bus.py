"""NATS JetStream plumbing shared by the services: connect, declare streams and consumers.

Streams and consumers are declared with ``add_stream`` / ``add_consumer`` (which also update an
existing one), never through ``pull_subscribe(config=...)``: nats-py silently ignores that config
when the durable exists already (see NATS_NOTES.md).
"""

from __future__ import annotations

import logging

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BadRequestError, NotFoundError

from proto.names import Names

log = logging.getLogger("zapbus.bus")

DUPLICATE_WINDOW_SECONDS = 15 * 60.0


async def connect(url: str, name: str) -> NATS:
    """A NATS connection that never stops reconnecting (nats-py gives up after ~2 min)."""

    async def on_disconnect() -> None:
        log.warning("nats disconnected")

    async def on_reconnect() -> None:
        log.info("nats reconnected")

    async def on_error(exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    return await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=2,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        error_cb=on_error,
    )


def stream_configs(names: Names) -> list[js_api.StreamConfig]:
    return [
        js_api.StreamConfig(
            name=names.commands_stream,
            subjects=[names.commands_subjects],
            retention=js_api.RetentionPolicy.WORK_QUEUE,
            storage=js_api.StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
        ),
        js_api.StreamConfig(
            name=names.events_stream,
            subjects=[names.events_subjects],
            retention=js_api.RetentionPolicy.LIMITS,
            storage=js_api.StorageType.FILE,
            max_age=7 * 24 * 3600.0,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
        ),
        js_api.StreamConfig(
            name=names.dead_letter_stream,
            subjects=[names.dead_letter_subject],
            retention=js_api.RetentionPolicy.LIMITS,
            storage=js_api.StorageType.FILE,
            max_age=30 * 24 * 3600.0,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
        ),
        js_api.StreamConfig(
            name=names.changes_stream,
            subjects=[names.changes_subjects],
            retention=js_api.RetentionPolicy.LIMITS,
            storage=js_api.StorageType.FILE,
            max_age=24 * 3600.0,  # how far back an SSE client can resume
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
        ),
    ]


async def ensure_streams(js: JetStreamContext, names: Names) -> None:
    """Create the zapbus streams, or bring an existing one's config up to date."""
    for config in stream_configs(names):
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)


async def ensure_consumer(
    js: JetStreamContext, stream: str, config: js_api.ConsumerConfig
) -> JetStreamContext.PullSubscription:
    """Create or update a durable pull consumer and bind to it."""
    assert config.durable_name
    await js.add_consumer(stream, config)
    return await js.pull_subscribe_bind(config.durable_name, stream=stream)


async def delete_streams(js: JetStreamContext, names: Names) -> None:
    """Remove every stream of a namespace (tests clean up with this)."""
    for stream in names.all_streams:
        try:
            await js.delete_stream(stream)
        except NotFoundError:
            pass
