"""The session worker's Prometheus metrics, registered on the app's own registry.

Labelled counters start at zero for every label value the worker knows, so a query sees the
series before the first retry or dead letter, and ``increase()`` counts that first one.
"""

from __future__ import annotations

from itertools import product

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from zapbus.consumer import PendingGauges
from zapbus.httpkit import LATENCY_BUCKETS

COMMAND_KINDS = ("create", "delete", "pairing_code")
OUTCOMES = ("succeeded", "retried", "failed", "fenced", "waiting", "deferred", "replaced")
FAILURE_REASONS = ("permanent", "exhausted")


def command_kind(subject: str) -> str:
    """The kind of the command on ``subject`` (see ``Names.command_subject``), or ``unknown``."""
    kind = subject.rsplit(".", 1)[-1]
    return kind if kind in COMMAND_KINDS else "unknown"


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter(
            "zapbus_worker_commands_started_total",
            "Command deliveries taken up by the worker (redeliveries included), by kind.",
            ["kind"],
            registry=registry,
        )
        self.commands = Counter(
            "zapbus_worker_commands_total",
            "Command deliveries finished, by kind and outcome "
            "(succeeded, retried, failed, fenced, interrupted, error).",
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
            "1 while the circuit breaker in front of a Baileys server is open, by server.",
            ["server"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "zapbus_worker_dead_letters_total",
            "Commands published to the dead-letter stream.",
            ["kind"],
            registry=registry,
        )
        self.consumer = PendingGauges(registry)
        for kind in COMMAND_KINDS:
            self.started.labels(kind)
            self.dead_letters.labels(kind)
        for kind, outcome in product(COMMAND_KINDS, OUTCOMES):
            self.commands.labels(kind, outcome)
        for kind, reason in product(COMMAND_KINDS, FAILURE_REASONS):
            self.failures.labels(kind, reason)
        self.failures.labels("unknown", "undecodable")
        self.dead_letters.labels("unknown")
