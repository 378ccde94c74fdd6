"""The webhook service's Prometheus metrics."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "zapbus_webhook_events_total",
            "Webhook deliveries by event kind and outcome (accepted, duplicate, ignored, "
            "rejected_token, rejected_payload, rejected_session, unavailable).",
            ["event", "outcome"],
            registry=registry,
        )


metrics_key = web.AppKey("webhook_metrics", WebhookMetrics)
