"""The webhook service's Prometheus metrics.

Every (event, outcome) pair the handler can count starts at zero, so a rejection rate is
defined before the first rejection arrives.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

# event kind -> the outcomes the handler counts for it
EVENT_OUTCOMES = {
    "qr.update": ("accepted", "duplicate", "unavailable"),
    "session.status": ("accepted", "duplicate", "unavailable"),
    "pairing_code": ("accepted", "duplicate", "unavailable"),
    "other": ("ignored", "unavailable"),
    "unknown": ("rejected_token", "rejected_signature", "rejected_payload", "rejected_session"),
}


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "zapbus_webhook_events_total",
            "Webhook deliveries by event kind and outcome (accepted, duplicate, ignored, "
            "rejected_token, rejected_signature, rejected_payload, rejected_session, unavailable).",
            ["event", "outcome"],
            registry=registry,
        )
        for event, outcomes in EVENT_OUTCOMES.items():
            for outcome in outcomes:
                self.events.labels(event, outcome)


metrics_key = web.AppKey("webhook_metrics", WebhookMetrics)
