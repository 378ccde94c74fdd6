"""The session worker's Prometheus metrics, registered on the app's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from zapbus.httpkit import LATENCY_BUCKETS


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.commands = Counter(
            "zapbus_worker_commands_total",
            "Commands handled, by kind and outcome (succeeded, retried, failed, terminated).",
            ["kind", "outcome"],
            registry=registry,
        )
        self.failures = Counter(
            "zapbus_worker_command_failures_total",
            "Commands given up, by kind and reason class (permanent, exhausted, undecodable).",
            ["kind", "reason"],
            registry=registry,
        )
        self.baileys_seconds = Histogram(
            "zapbus_worker_baileys_call_duration_seconds",
            "Duration of calls to the Baileys server, by operation and outcome.",
            ["operation", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "zapbus_worker_commands_in_flight",
            "Commands being worked on right now.",
            registry=registry,
        )
        self.breaker_open = Gauge(
            "zapbus_worker_breaker_open",
            "1 while the circuit breaker in front of the Baileys server is open.",
            registry=registry,
        )
        self.dead_letters = Counter(
            "zapbus_worker_dead_letters_total",
            "Commands published to the dead-letter stream.",
            ["kind"],
            registry=registry,
        )
