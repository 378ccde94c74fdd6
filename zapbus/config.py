"""Configuration, read once from ``ZAPBUS_*`` environment variables into a frozen Struct.

Nothing else in zapbus touches ``os.environ``. A malformed variable fails at start with its name.
Every service reads the same Settings and uses the part it needs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from proto.names import Names
from zapbus.servers import ServerSpec, parse_servers


class ConfigError(Exception):
    """A ``ZAPBUS_*`` variable is missing or malformed."""


# The built-in webhook secret: public, so fit only for development (see require_own_secrets).
DEV_WEBHOOK_SECRET = "dev-webhook-secret-change-me"


# Integer settings by what they count; a value outside is refused at start, naming the variable.
Count = Annotated[int, msgspec.Meta(ge=1)]  # at least one (a pool size, attempts, a batch)
Limit = Annotated[int, msgspec.Meta(ge=0)]  # 0 allowed (no cap, no redrive)
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    # one server, or a cluster's nodes comma-separated (the client moves to another when one dies)
    nats_url: str = "nats://127.0.0.1:4222"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    # Postgres schema holding zapbus's tables (tests use one per test).
    db_schema: str = "public"
    db_pool_size: Count = 20  # connections per service process
    # A statement that runs longer fails (a hung Postgres answers 503, not never).
    db_command_timeout_seconds: float = 5.0
    # Waiting longer for a free pooled connection fails the same way.
    db_acquire_timeout_seconds: float = 5.0
    namespace: str = "zapbus"
    # JetStream replicas of every zapbus stream (and so of its consumers): 1 on one server,
    # 3 on a 3-node cluster. Applied by `zapbus migrate`, which declares the streams.
    stream_replicas: Count = 1
    # History rows of connections deleted or terminal (failed, logged_out ...) this many days
    # ago are removed, and so are the rows of connections deleted that long ago (a periodic
    # job in the projector's watchdog loop). 0 keeps everything.
    history_retention_days: float = 90.0
    log_format: str = "auto"  # auto | json | text
    log_level: str = "INFO"
    # Listen with SO_REUSEPORT, so several processes of a service can share its port.
    reuse_port: bool = False
    # "dev" allows the built-in webhook secret (make run, the tests); anything else refuses it.
    env: str = "production"

    # gateway
    gateway_host: str = "127.0.0.1"
    gateway_port: Port = 8080
    outbox_poll_seconds: float = 1.0
    # A known API key is remembered this long (a rotated key stops working within it).
    api_key_cache_seconds: float = 5.0
    # An unknown API key is remembered this long, so a flood of bad keys costs no queries
    # (a key created meanwhile works once it passes).
    unknown_api_key_cache_seconds: float = 2.0
    public_gateway_url: str = "http://127.0.0.1:8080"
    # code login: a new pairing code at most this often per connection
    pairing_code_min_interval_seconds: float = 30.0
    # Open event streams (SSE) per tenant on one gateway replica; beyond, 429.
    sse_max_streams_per_tenant: Count = 100
    # Of those, open with client tokens of one connection (a token that leaked must not take
    # every slot of its tenant); beyond, 429.
    sse_max_streams_per_client_token: Count = 5
    # Signs client tokens (browser-safe access to one connection). Empty: derived from
    # webhook_secret. The gateway refuses the built-in one unless env is "dev".
    client_token_secret: str = ""

    # webhook
    webhook_host: str = "127.0.0.1"
    webhook_port: Port = 8081
    # Base URL the Baileys server uses to reach the webhook service.
    webhook_public_url: str = "http://127.0.0.1:8081"
    webhook_secret: str = DEV_WEBHOOK_SECRET  # refused unless env is "dev"
    webhook_max_body_bytes: Count = 256 * 1024
    # When set, every delivery must carry a valid Standard Webhooks signature
    # (webhook-id / webhook-timestamp / webhook-signature) made with this secret.
    webhook_signing_secret: str = ""
    webhook_signature_tolerance_seconds: float = 300.0

    # session worker
    worker_host: str = "127.0.0.1"
    worker_port: Port = 9102
    # Which Baileys server dialect (zapbus/dialects/): seed | evolution | waha | fazer
    baileys_kind: str = "seed"
    baileys_url: str = "http://127.0.0.1:3100"
    # A pool of servers: comma-separated ``name=url`` (a bare url is named by its host:port);
    # not together with ZAPBUS_BAILEYS_URL (a pool of one). See zapbus/servers.py.
    baileys_urls: str = ""
    baileys_api_key: str = "dev-baileys-key"
    # per-server keys, ``name=key,...`` (the others use baileys_api_key)
    baileys_api_keys: str = ""
    # sessions per server at most (zapbus's placements and the server's /health figure);
    # 0: no cap. A create finding every server full waits (pending) until one has room.
    baileys_max_sessions: Limit = 0
    # a server unreachable this long: its connections are re-placed on the others
    baileys_failover_after_seconds: float = 120.0
    # connections re-placed per second at most (failover and drain --move)
    baileys_failover_per_second: float = 10.0
    # a server back after an outage takes new placements only after this long healthy
    # (while another server can take them), so a flapping server does not pull them back
    baileys_rejoin_after_seconds: float = 60.0
    # how often the pool manager asks every server's health
    baileys_health_interval_seconds: float = 5.0
    baileys_timeout_seconds: float = 55.0
    create_max_attempts: Count = 5
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 60.0
    worker_concurrency: Count = 100
    # At most this many POST /sessions in flight against the Baileys server at once.
    baileys_max_concurrent_creates: Count = 50
    # The breaker opens after this many consecutive "server down" errors and then lets
    # commands wait (not fail) until GET /health answers again.
    breaker_threshold: Count = 5
    breaker_probe_seconds: float = 2.0
    ack_wait_seconds: float = 30.0

    # projector
    projector_host: str = "127.0.0.1"
    projector_port: Port = 9103
    projector_batch: Count = 512
    # Events are partitioned by connection; each partition is projected by one projector at a
    # time (leases in Postgres), so several projectors keep per-connection order.
    event_partitions: Count = 1
    qr_first_ttl_seconds: float = 60.0
    qr_next_ttl_seconds: float = 20.0
    qr_max_refreshes: Count = 6
    # 440 (connection replaced) this many times within the window ends in `conflict`
    conflict_loop_count: Count = 3
    conflict_loop_window_seconds: float = 60.0
    # watchdog: a connection in pending/creating longer than this is re-driven (its create
    # command re-published with the same id), up to watchdog_max_redrives times, then failed
    # with reason "timeout"; awaiting_qr past the deadline fails with "timeout" at once.
    watchdog_deadline_seconds: float = 180.0
    watchdog_interval_seconds: float = 15.0
    watchdog_max_redrives: Limit = 2

    # notifier: webhooks to the tenant's backend (services/notifier/)
    notifier_host: str = "127.0.0.1"
    notifier_port: Port = 9104
    # the first retry after this many seconds, doubling (with jitter) up to notify_retry_max
    notify_retry_base_seconds: float = 5.0
    notify_retry_max_seconds: float = 3600.0
    # a delivery is given up on this long after its first attempt
    notify_retry_for_seconds: float = 86400.0
    # an endpoint with no success for this long is disabled (with the reason, on the API)
    notify_disable_after_seconds: float = 3 * 86400.0
    # allow endpoint URLs on loopback / private / link-local addresses, and plain http
    # (make run sets it, for receivers on the developer's machine)
    notify_allow_private: bool = False
    notify_timeout_seconds: float = 10.0
    # deliveries in flight at once (each to a different endpoint and connection)
    notify_concurrency: Count = 64

    # reconciler (a loop in the session worker, one active replica at a time): compares the
    # sessions the Baileys server holds with what Postgres wants, every interval.
    reconcile_interval_seconds: float = 60.0
    # A wanted session missing for two sweeps is re-created only when its row has not changed
    # for this long (a create or a webhook may be on its way).
    reconcile_grace_seconds: float = 30.0
    # Re-creates of one generation's lost session before it fails for good.
    reconcile_max_recreates: Limit = 3
    # Delete zapbus-named sessions that match no connection here (off: two deployments may
    # share one Baileys server).
    reconcile_delete_unknown: bool = False

    # The loops one replica runs at a time (pool manager, reconciler, notifier fan-out,
    # retention) hold a lease (zapbus/leases.py): a replica frozen this long loses it to
    # another. Also Postgres's idle_in_transaction_session_timeout for the services' pools,
    # so a frozen transaction does not keep its row locks (a placement's lock) forever.
    leader_timeout_seconds: float = 30.0

    # shutdown: how long in-flight work may take after SIGTERM
    shutdown_grace_seconds: float = 10.0

    # make run: the API key of the "dev" tenant (a random one when empty)
    dev_api_key: str = ""
    # make run: start NATS and Postgres from the pip wheels (data in .zapbus/) even when
    # something answers on the default ports (a given ZAPBUS_NATS_URL/DATABASE_URL still wins)
    embedded: bool = False

    @property
    def names(self) -> Names:
        return Names(namespace=self.namespace, event_partitions=self.event_partitions)

    @property
    def servers(self) -> tuple[ServerSpec, ...]:
        """The Baileys servers of the pool (validated by load_settings)."""
        return parse_servers(
            self.baileys_urls, self.baileys_url, self.baileys_api_key, self.baileys_api_keys
        )


_FIELDS: dict[str, Any] = {f.name: f.type for f in msgspec.structs.fields(Settings)}


def load_settings(env: Mapping[str, str] | None = None, /, **overrides: Any) -> Settings:
    """Read Settings from ``env`` (default: the process environment), then apply overrides
    (``env`` is positional-only: ``env="dev"`` is the override of the setting of that name)."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    for name in _FIELDS:
        var = f"ZAPBUS_{name.upper()}"
        if var in env:
            raw[name] = env[var]
    raw.update(overrides)
    if raw.get("baileys_urls") and raw.get("baileys_url"):
        raise ConfigError(
            "bad configuration: ZAPBUS_BAILEYS_URL and ZAPBUS_BAILEYS_URLS are both set; use"
            " ZAPBUS_BAILEYS_URLS for a pool (one server is a pool of one)"
        )
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
        settings.names  # noqa: B018 (validates the namespace and partitions)
        from zapbus.dialects import KINDS

        try:
            settings.servers  # noqa: B018
        except ValueError as exc:
            raise ConfigError(f"bad configuration in {exc}") from exc
        for name, value in msgspec.structs.asdict(settings).items():
            # every float setting is a duration, a rate or a number of days
            if isinstance(value, float) and not (math.isfinite(value) and value >= 0):
                raise ConfigError(
                    f"bad configuration in ZAPBUS_{name.upper()}: must be a finite number >= 0"
                )
        for name in (
            "baileys_failover_per_second",
            "baileys_health_interval_seconds",
            "leader_timeout_seconds",
        ):
            if getattr(settings, name) <= 0:
                raise ConfigError(f"bad configuration in ZAPBUS_{name.upper()}: must be > 0")
        for name in ("baileys_failover_after_seconds", "baileys_rejoin_after_seconds"):
            if getattr(settings, name) < 0:
                raise ConfigError(f"bad configuration in ZAPBUS_{name.upper()}: must be >= 0")
        if settings.baileys_kind not in KINDS:
            raise ConfigError(
                f"bad configuration in ZAPBUS_BAILEYS_KIND: {settings.baileys_kind!r} is not one"
                f" of {', '.join(KINDS)}"
            )
    except (msgspec.ValidationError, ValueError) as exc:
        field = str(exc).split("`$.", 1)[-1].split("`", 1)[0] if "`$." in str(exc) else ""
        if not field:
            field = "event_partitions" if "event_partitions" in str(exc) else "namespace"
        var = f"ZAPBUS_{field.upper()}"
        raise ConfigError(f"bad configuration in {var}: {exc}") from exc
    return settings


def require_own_secrets(settings: Settings) -> None:
    """Refuse the built-in webhook secret outside ``ZAPBUS_ENV=dev``: it is public, so anyone
    could mint webhook URLs and forge QR codes and statuses. Raises ConfigError."""
    if settings.env != "dev" and settings.webhook_secret in (DEV_WEBHOOK_SECRET, ""):
        raise ConfigError(
            "ZAPBUS_WEBHOOK_SECRET is not set (the built-in default is public): set it to a"
            " long random value, the same for the webhook service and the session worker"
            " (or ZAPBUS_ENV=dev for local development)"
        )


def require_client_token_secret(settings: Settings) -> None:
    """Refuse to sign client tokens with a public key outside ``ZAPBUS_ENV=dev``: with
    neither ``ZAPBUS_CLIENT_TOKEN_SECRET`` nor an own ``ZAPBUS_WEBHOOK_SECRET`` (from which it
    is derived), anyone could mint a token for any connection. Raises ConfigError."""
    if settings.env == "dev":
        return
    own = settings.client_token_secret or settings.webhook_secret
    if own in (DEV_WEBHOOK_SECRET, ""):
        raise ConfigError(
            "ZAPBUS_CLIENT_TOKEN_SECRET is not set, nor ZAPBUS_WEBHOOK_SECRET (the built-in"
            " default is public): the gateway signs client tokens with it; set it to a long"
            " random value, the same on every gateway replica (or ZAPBUS_ENV=dev for local"
            " development)"
        )
