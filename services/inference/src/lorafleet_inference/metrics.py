"""Prometheus metrics of one inference replica, on a registry of its own (documented in docs/metrics.md)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

from lorafleet_inference.memory import MemoryCollector

log = logging.getLogger(__name__)

BASE_LABEL = "base"
OTHER_LABEL = "other"
TIERS = ("gpu", "cpu", "disk")
MERGE_RESULTS = ("ok", "rejected", "drain_timeout", "error")

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
_LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class InferenceMetrics:
    """Counters, gauges and histograms the service updates; label values stay bounded."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, max_adapter_labels: int = 50, memory: bool = True
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self._max_adapter_labels = max_adapter_labels
        self._adapter_labels: set[str] = set()
        self._labels_lock = threading.Lock()
        r = self.registry
        # ----- requests and tokens (adapter label: "base", a served adapter's name, or "other") -----
        self.requests = Counter(
            "lorafleet_requests", "Generate requests by adapter and outcome.", ["adapter", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "lorafleet_prompt_tokens", "Prompt tokens of requests sent to the engine.", ["adapter"], registry=r
        )
        self.generation_tokens = Counter("lorafleet_generation_tokens", "Tokens generated.", ["adapter"], registry=r)
        self.time_to_first_token = Histogram(
            "lorafleet_time_to_first_token_seconds",
            "From the Generate call (including any adapter load) to its first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "lorafleet_inter_token_latency_seconds",
            "Time between successive streamed outputs of a request, per token they carry.",
            buckets=_TOKEN_GAP_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "lorafleet_request_duration_seconds", "Whole Generate calls.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.requests_running = Gauge("lorafleet_requests_running", "Generate requests producing tokens.", registry=r)
        self.requests_waiting = Gauge(
            "lorafleet_requests_waiting",
            "Generate requests admitted but without a token yet (adapter loading, queued, prefilling).",
            registry=r,
        )
        # ----- the engine's own view (vLLM scheduler stats, updated every engine step) -----
        self.engine_requests_running = Gauge(
            "lorafleet_engine_requests_running", "Requests the vLLM scheduler is running.", registry=r
        )
        self.engine_requests_waiting = Gauge(
            "lorafleet_engine_requests_waiting", "Requests queued in the vLLM scheduler.", registry=r
        )
        self.kv_cache_usage = Gauge(
            "lorafleet_kv_cache_usage_ratio", "Fraction of the KV cache blocks in use (0-1).", registry=r
        )
        # ----- adapter tiers: gpu (engine LoRA slots), cpu (registered with the engine), disk -----
        self.adapter_loads = Counter(
            "lorafleet_adapter_loads",
            "Adapter loads into a tier (disk: store -> validated local copy; cpu: disk -> engine) by result.",
            ["tier", "result"],
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "lorafleet_adapter_load_seconds",
            "Time to load an adapter into a tier (disk: download + validation; cpu: the engine's add_lora).",
            ["tier"],
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.adapter_cache_hits = Counter(
            "lorafleet_adapter_cache_hits",
            "Generate requests whose adapter was found in this tier (checked gpu, then cpu, then disk).",
            ["tier"],
            registry=r,
        )
        self.adapter_cache_misses = Counter(
            "lorafleet_adapter_cache_misses",
            "Generate requests whose adapter was not in this tier (a miss falls through to the next tier).",
            ["tier"],
            registry=r,
        )
        self.adapter_evictions = Counter(
            "lorafleet_adapter_evictions", "Adapters pushed out of a tier to make room.", ["tier"], registry=r
        )
        self.adapters_cached = Gauge("lorafleet_adapters_cached", "Adapters held per tier.", ["tier"], registry=r)
        self.adapter_disk_cache_bytes = Gauge(
            "lorafleet_adapter_disk_cache_bytes", "Bytes of validated adapter copies on local disk.", registry=r
        )
        # ----- merged mode (merge.py) -----
        self.merge_state = Gauge(
            "lorafleet_merge_state",
            "Serving mode (MergeState): 0 LoRA, 1 merging, 2 merged (one adapter in the weights), 3 unmerging.",
            registry=r,
        )
        self.merged_adapter = Gauge(
            "lorafleet_merged_adapter",
            "1 for the adapter merged into the base weights while the replica is merged; no series otherwise.",
            ["adapter"],
            registry=r,
        )
        self.merge_switches = Counter(
            "lorafleet_merge_switches",
            "MergeAdapter calls that tried to change the weights, by result.",
            ["result"],
            registry=r,
        )
        self.merge_switch_seconds = Histogram(
            "lorafleet_merge_switch_seconds",
            "Successful switches by phase: drain (requests in flight finishing), weights (workers + prefix cache).",
            ["phase"],
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        for result in MERGE_RESULTS:
            self.merge_switches.labels(result)
        for tier in TIERS:  # every series exists from the start: rate() and ratios work before the first event
            self.adapter_cache_hits.labels(tier)
            self.adapter_cache_misses.labels(tier)
            self.adapter_evictions.labels(tier)
            self.adapters_cached.labels(tier).set(0)
        # process_resident_memory_bytes etc., prefixed: lorafleet_process_resident_memory_bytes.
        ProcessCollector(namespace="lorafleet", registry=r)
        if memory:
            r.register(MemoryCollector())

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
