"""The projector's Prometheus metrics, registered on the app's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from zapbus.consumer import PendingGauges
from zapbus.httpkit import LATENCY_BUCKETS


class ProjectorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "zapbus_projector_events_total",
            "Events handled by the projector, by event type and outcome "
            "(applied, ignored, duplicate, orphan, undecodable, rejected).",
            ["event_type", "outcome"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "zapbus_projector_batch_size",
            "Events per projected batch (one Postgres transaction each).",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=registry,
        )
        self.lag = Histogram(
            "zapbus_projector_lag_seconds",
            "Time from an event happening to its projection being committed.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_failures = Counter(
            "zapbus_projector_batch_failures_total",
            "Batches whose transaction failed and were handed back for redelivery.",
            registry=registry,
        )
        self.consumer = PendingGauges(registry)
