"""Prometheus metrics of one gateway instance, on a registry passed in (never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class GatewayMetrics:
    """lorafleet_gateway_* series."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "lorafleet_gateway_requests",
            "HTTP requests by route template, model kind (base, adapter, none) and status code.",
            ["route", "model_kind", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "lorafleet_gateway_request_seconds",
            "Wall time of HTTP requests, to the last byte of the response (whole stream when streaming).",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "lorafleet_gateway_time_to_first_token_seconds",
            "Time from sending Generate upstream to the first chunk, retries included.",
            ["model_kind"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "lorafleet_gateway_upstream_errors",
            "Failed calls to an inference replica, by replica target.",
            ["replica"],
            registry=registry,
        )
