"""Prometheus metrics of the simulator, in a registry private to one app instance."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

__all__ = ["SimMetrics"]


class SimMetrics:
    """Counters and gauges of one simulator app (tests run several apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.sessions_created = Counter(
            "zapbus_sim_sessions_created_total",
            "Sessions created by POST /sessions.",
            registry=self.registry,
        )
        self.create_requests = Counter(
            "zapbus_sim_create_requests_total",
            "POST /sessions answers, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.sessions_live = Gauge(
            "zapbus_sim_sessions_live",
            "Sessions currently alive.",
            registry=self.registry,
        )
        self.webhooks_sent = Counter(
            "zapbus_sim_webhooks_sent_total",
            "Webhook deliveries answered 2xx.",
            registry=self.registry,
        )
        self.webhooks_failed = Counter(
            "zapbus_sim_webhooks_failed_total",
            "Webhooks given up on after every retry failed.",
            registry=self.registry,
        )
        self.webhook_attempts_failed = Counter(
            "zapbus_sim_webhook_attempts_failed_total",
            "Single webhook POST attempts that failed (non-2xx or connection error).",
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The metrics in Prometheus text exposition format."""
        return generate_latest(self.registry)
