"""The notifier's Prometheus metrics, registered on the app's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from zapbus.consumer import PendingGauges
from zapbus.httpkit import LATENCY_BUCKETS


class NotifierMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.deliveries = Counter(
            "zapbus_notify_deliveries_total",
            "Webhook delivery attempts by outcome (succeeded, retried, given_up).",
            ["outcome"],
            registry=registry,
        )
        self.queued = Counter(
            "zapbus_notify_queued_total",
            "Webhook deliveries queued from connection changes, by event type.",
            ["event_type"],
            registry=registry,
        )
        self.latency = Histogram(
            "zapbus_notify_attempt_seconds",
            "Time of one webhook delivery attempt (request to answer or error).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.backlog = Gauge(
            "zapbus_notify_backlog",
            "Webhook deliveries not yet delivered nor given up, per endpoint.",
            ["endpoint"],
            registry=registry,
        )
        self.pending = Gauge(
            "zapbus_notify_pending_deliveries",
            "Webhook deliveries not yet delivered nor given up, all endpoints together.",
            registry=registry,
        )
        self.disabled = Gauge(
            "zapbus_notify_endpoints_disabled",
            "Webhook endpoints disabled after failing for ZAPBUS_NOTIFY_DISABLE_AFTER_SECONDS.",
            registry=registry,
        )
        self.consumer = PendingGauges(registry)
        for outcome in ("succeeded", "retried", "given_up"):
            self.deliveries.labels(outcome)  # exported at 0 from the start
