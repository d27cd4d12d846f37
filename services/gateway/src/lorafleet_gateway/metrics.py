"""Prometheus metrics of one gateway instance, on a registry passed in (never the global one).

With several worker processes (workers.py) prometheus_client runs in its multiprocess mode: each process
writes its values to files in one folder, and reads (/metrics, the adapter details' traffic) add up every
process's files, so they show the whole gateway whichever worker answers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


M = TypeVar("M", Counter, Gauge, Histogram)


class Children(Generic[M]):
    """The children of a labelled metric, each looked up once, by its label values in the metric's label order.

    prometheus_client's ``.labels()`` checks and sorts its arguments and takes a
    lock on every call (about 10 us on the benchmark machine); the request path
    needs several per request. Only for metrics whose children are never
    removed (a removed child would live on here). As bounded as the metric:
    its label values are (see GatewayMetrics).
    """

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


@dataclass
class Traffic:
    """What this gateway served of one model since it started (requests by status, tokens by kind)."""

    requests: int = 0
    errors: int = 0  # responses with status >= 400
    prompt_tokens: int = 0
    completion_tokens: int = 0


class GatewayMetrics:
    """lorafleet_gateway_* series.

    ``model`` labels carry only models that resolved (the base model id, or an
    adapter's store name "<tenant>/<id>"; else "none"), and ``tenant`` only
    authenticated tenants (else "none"), so a caller cannot grow the series
    count by sending made-up names.
    """

    def __init__(self, registry: CollectorRegistry, multiprocess_dir: Path | None = None) -> None:
        """``multiprocess_dir``: the workers' prometheus_client multiprocess folder, None for a single process."""
        self.registry = registry
        self._multiprocess_dir = multiprocess_dir
        # Multiprocess mode: replicas this worker stopped routing to, whose series its reads leave out.
        self._retired_replicas: set[str] = set()
        self.requests = Counter(
            "lorafleet_gateway_requests",
            "HTTP requests by route template, tenant, model, model kind (base, adapter, none) and status code.",
            ["route", "tenant", "model", "model_kind", "status"],
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
        self.upstream_retries = Counter(
            "lorafleet_gateway_upstream_retries",
            "Requests retried on another replica after this replica failed before the first token.",
            ["replica"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "lorafleet_gateway_rate_limited",
            "Requests rejected with 429 by the per-key limits, by tenant and limit (requests, tokens).",
            ["tenant", "limit"],
            registry=registry,
        )
        self.replica_up = Gauge(
            "lorafleet_gateway_replica_up",
            "1 while an inference replica is in rotation, 0 while it is ejected.",
            ["replica"],
            registry=registry,
            # Each worker ejects on its own: 0 as soon as one worker has it out of rotation.
            multiprocess_mode="livemin",
        )
        self.replica_in_flight = Gauge(
            "lorafleet_gateway_replica_in_flight",
            "Generate calls this gateway has open on each inference replica.",
            ["replica"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.replica_ejections = Counter(
            "lorafleet_gateway_replica_ejections",
            "Times an inference replica was taken out of rotation after consecutive failures.",
            ["replica"],
            registry=registry,
        )
        self.routing_decisions = Counter(
            "lorafleet_gateway_routing_decisions",
            "Replica choices by reason: merged (adapter merged into that replica's weights), affinity (adapter "
            "loaded there), hashed (cold adapter's home replica), least_loaded, switching (no other replica: one "
            "switching into a mode that serves it).",
            ["reason"],
            registry=registry,
        )
        self.merge_decisions = Counter(
            "lorafleet_gateway_merge_decisions",
            "MergeAdapter calls of the hot-adapter planner by action (merge, unmerge) and outcome (ok, unchanged, "
            "refused, timeout, failed).",
            ["action", "outcome"],
            registry=registry,
        )
        self.hot_adapter_share = Gauge(
            "lorafleet_gateway_hot_adapter_share",
            "Share (0-1) of the tokens served over the hot-adapter planner's window taken by the busiest adapter.",
            registry=registry,
            # Only the planning worker sets it; the others' 0 must not hide it.
            multiprocess_mode="livemax",
        )
        self.tokens = Counter(
            "lorafleet_gateway_tokens",
            "Tokens of finished generations by tenant, model (as in lorafleet_gateway_requests) and kind "
            "(prompt, completion).",
            ["tenant", "model", "kind"],
            registry=registry,
        )
        # The per-request series, bound once per label values (see Children).
        self._requests = Children(self.requests)
        self._request_seconds = Children(self.request_seconds)
        self._time_to_first_token = Children(self.time_to_first_token)
        self._routing_decisions = Children(self.routing_decisions)
        self._tokens = Children(self.tokens)

    def observe_request(
        self, route: str, tenant: str, model: str, model_kind: str, status: int, seconds: float
    ) -> None:
        self._requests(route, tenant, model, model_kind, str(status)).inc()
        self._request_seconds(route).observe(seconds)

    def observe_first_token(self, model_kind: str, seconds: float) -> None:
        self._time_to_first_token(model_kind).observe(seconds)

    def count_routing(self, reason: str) -> None:
        self._routing_decisions(reason).inc()

    def count_tokens(self, tenant: str, model: str, *, prompt: int, completion: int) -> None:
        self._tokens(tenant, model, "prompt").inc(prompt)
        self._tokens(tenant, model, "completion").inc(completion)

    def add_replica(self, target: str) -> Gauge:
        """A replica routed to from now on: up (1), its series shown again if it was retired; returns its in-flight
        gauge child, for the replica to bind once."""
        self._retired_replicas.discard(target)
        self.replica_up.labels(replica=target).set(1)
        return self.replica_in_flight.labels(replica=target)

    def forget_replica(self, target: str) -> None:
        """Drop the gauge series of a replica no longer routed to (its counters stay: they are history).

        prometheus_client cannot remove a series in multiprocess mode, where every worker's files keep their
        values: there this worker's reads leave the replica's gauges out instead. Each worker retires a replica on
        its own DNS refresh, so for up to one refresh interval a worker that has not yet may still show it.
        """
        if self._multiprocess_dir is not None:
            self._retired_replicas.add(target)
            return
        for gauge in (self.replica_up, self.replica_in_flight):
            with contextlib.suppress(KeyError):
                gauge.remove(target)

    def exposition(self) -> bytes:
        """/metrics: the Prometheus text format of the whole gateway."""
        return generate_latest(self._readable_registry())

    def traffic(self) -> dict[str, Traffic]:
        """Per-model totals read back from the counters (model label: base model id or adapter store name)."""
        if self._multiprocess_dir is None:
            requests, tokens = self.requests.collect(), self.tokens.collect()
        else:
            families = list(self._readable_registry().collect())
            requests = _named(families, "lorafleet_gateway_requests")
            tokens = _named(families, "lorafleet_gateway_tokens")
        totals: dict[str, Traffic] = defaultdict(Traffic)
        for metric in requests:
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.labels["model"] != "none":
                    entry = totals[sample.labels["model"]]
                    entry.requests += int(sample.value)
                    if int(sample.labels["status"]) >= 400:
                        entry.errors += int(sample.value)
        for metric in tokens:
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    entry = totals[sample.labels["model"]]
                    if sample.labels["kind"] == "prompt":
                        entry.prompt_tokens += int(sample.value)
                    else:
                        entry.completion_tokens += int(sample.value)
        return dict(totals)

    def _readable_registry(self) -> CollectorRegistry:
        """This gateway's registry; in multiprocess mode a fresh one that adds up every worker's files now."""
        if self._multiprocess_dir is None:
            return self.registry
        registry = CollectorRegistry()
        registry.register(_WorkerFiles(self._multiprocess_dir, set(self._retired_replicas)))
        return registry


class _WorkerFiles(Collector):
    """Every worker's files added up, read while no dead worker's files are being folded (``fold_dead_worker``),
    less the replica gauges of the given replicas."""

    _GAUGES = frozenset({"lorafleet_gateway_replica_up", "lorafleet_gateway_replica_in_flight"})

    def __init__(self, folder: Path, retired_replicas: set[str]) -> None:
        self._folder = folder
        self._inner = MultiProcessCollector(None, path=str(folder))
        self._retired = retired_replicas

    def collect(self) -> Iterable[Metric]:
        with _folder_lock(self._folder, exclusive=False):
            metrics = list(self._inner.collect())
        for metric in metrics:
            if self._retired and metric.name in self._GAUGES:
                metric.samples = [s for s in metric.samples if s.labels.get("replica") not in self._retired]
        return metrics


def fold_dead_worker(folder: Path, pid: int) -> None:
    """A worker process died: its live gauges leave the totals, its counters and histograms are added into the
    folder's archive files and its own files deleted, so totals stay the same and restarts pile up no files.

    Under the folder's lock: a read sees the dead worker's counts in its files or in the archive, never in both or
    neither (a counter that jumped or went back would read as a reset to Prometheus).
    """
    mark_process_dead(pid, str(folder))
    with _folder_lock(folder, exclusive=True):
        for kind in ("counter", "histogram"):
            dead = folder / f"{kind}_{pid}.db"
            if not dead.exists():
                continue
            archive = MmapedDict(str(folder / f"{kind}_archive.db"))
            try:
                for key, value, timestamp, _pos in MmapedDict.read_all_values_from_file(str(dead)):
                    total, _ = archive.read_value(key)
                    archive.write_value(key, total + value, timestamp)
            finally:
                archive.close()
            dead.unlink()


@contextlib.contextmanager
def _folder_lock(folder: Path, *, exclusive: bool) -> Iterator[None]:
    # Not a *.db name: prometheus_client reads every *.db file of the folder as metrics.
    fd = os.open(folder / ".fold.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def _named(families: Iterable[Metric], name: str) -> list[Metric]:
    return [family for family in families if family.name == name]
