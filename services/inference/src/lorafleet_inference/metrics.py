"""Prometheus metrics of one inference replica, on a registry of its own."""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

log = logging.getLogger(__name__)

BASE_LABEL = "base"
OTHER_LABEL = "other"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class InferenceMetrics:
    """Counters and histograms the service updates; label values stay bounded."""

    def __init__(self, registry: CollectorRegistry | None = None, *, max_adapter_labels: int = 50) -> None:
        self.registry = registry or CollectorRegistry()
        self._max_adapter_labels = max_adapter_labels
        self._adapter_labels: set[str] = set()
        self._labels_lock = threading.Lock()
        r = self.registry
        self.requests = Counter(
            "lorafleet_requests", "Generate requests by adapter and outcome.", ["adapter", "status"], registry=r
        )
        self.prompt_tokens = Counter("lorafleet_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("lorafleet_generation_tokens", "Tokens generated.", registry=r)
        self.time_to_first_token = Histogram(
            "lorafleet_time_to_first_token_seconds",
            "From admission (adapter resolved, prompt rendered) to the first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "lorafleet_request_duration_seconds", "Whole Generate calls.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.adapter_loads = Counter(
            "lorafleet_adapter_loads", "Adapter fetch-validate-load attempts by result.", ["result"], registry=r
        )
        self.adapter_load_seconds = Histogram(
            "lorafleet_adapter_load_seconds", "Time to fetch, validate and load an adapter.", registry=r
        )
        self.adapters_loaded = Gauge("lorafleet_adapters_loaded", "Adapters registered with the engine.", registry=r)
        self.requests_running = Gauge("lorafleet_requests_running", "Generate requests in flight.", registry=r)
        # process_resident_memory_bytes etc., prefixed: lorafleet_process_resident_memory_bytes.
        ProcessCollector(namespace="lorafleet", registry=r)

    def adapter_label(self, adapter_name: str | None, *, requested: bool = True) -> str:
        """The adapter's name as a label value: "base" for the base model, the first N served names keep
        theirs, later ones and names that never resolved (unknown, invalid) share "other"."""
        if not requested:
            return BASE_LABEL
        if not adapter_name:
            return OTHER_LABEL
        with self._labels_lock:
            if adapter_name in self._adapter_labels:
                return adapter_name
            if len(self._adapter_labels) < self._max_adapter_labels:
                self._adapter_labels.add(adapter_name)
                return adapter_name
        return OTHER_LABEL


def serve_metrics(metrics: InferenceMetrics, host: str, port: int) -> Any:
    """Start the /metrics HTTP server on a daemon thread; returns the server (call .shutdown() to stop)."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server
