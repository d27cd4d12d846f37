"""The set of inference replicas: discovery (static or DNS), health and Stats polling, ejection, load.

Targets are "host:port" (static) or "dns:///name:port": every address the
name resolves to, re-resolved every ``dns_refresh_s`` (a Kubernetes headless
Service lists one address per ready pod). A failed or empty resolution keeps
the previous answer, so a DNS hiccup does not empty the pool.

Every ``health_interval_s`` each replica is asked for grpc.health.v1 and its
Stats (load, loaded adapters, merge mode). A replica is ejected (skipped by
routing) after ``eject_after`` consecutive failures (health checks that fail,
or calls that find it UNAVAILABLE), or at once when its health says
NOT_SERVING (it is draining), and re-admitted as soon as a check answers
SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorafleet.inference.v1 import inference_pb2, inference_pb2_grpc
from lorafleet_common.grpc_targets import DNS_SCHEME
from lorafleet_common.grpc_tls import GrpcTls
from lorafleet_gateway.metrics import GatewayMetrics
from lorafleet_gateway.upstream.channels import open_channel
from lorafleet_gateway.upstream.routing import Mode, ReplicaLoad

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], list[str]]

_MODES: dict[int, Mode] = {
    inference_pb2.MERGE_STATE_LORA: "lora",
    inference_pb2.MERGE_STATE_MERGED: "merged",
    inference_pb2.MERGE_STATE_MERGING: "switching",
    inference_pb2.MERGE_STATE_UNMERGING: "switching",
}


def resolve_dns(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, as sorted "addr:port" targets (IPv6 in brackets)."""
    targets = set()
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        address = str(sockaddr[0])
        targets.add(f"[{address}]:{port}" if family == socket.AF_INET6 else f"{address}:{port}")
    return sorted(targets)


@dataclass
class Replica:
    """One inference replica as the gateway sees it."""

    target: str
    channel: grpc.aio.Channel = field(repr=False)
    stub: Any = field(repr=False)
    health: Any = field(repr=False)
    in_flight: int = 0  # Generate calls this gateway has open there
    ejected: bool = False  # optimistic at first, so a gateway that starts first serves as soon as replicas do
    failures: int = 0  # consecutive
    serving: bool | None = None  # what the last health check said
    running: int = 0  # from the last Stats
    waiting: int = 0
    in_flight_at_stats: int = 0
    adapters: frozenset[str] = frozenset()
    # Merge mode, from the last Stats (or set at once by the hot-adapter planner's own MergeAdapter calls).
    merge_capable: bool = False
    merge_state: int = inference_pb2.MERGE_STATE_LORA
    merged_adapter: str = ""  # "name@version"; while switching, the target ("" when unmerging)
    merged_for_s: float = 0.0
    stats_at: float = 0.0  # time.monotonic() of that Stats answer
    # Its lorafleet_gateway_replica_in_flight child, bound once: .labels() costs ~10 us, and every request sets it
    # twice. Detached when the replica is retired (a re-added target gets a new Replica and a new child).
    in_flight_gauge: Any = field(default=None, repr=False)

    @property
    def mode(self) -> Mode:
        return _MODES.get(self.merge_state, "switching")  # a state newer than this gateway: send it nothing

    @property
    def load(self) -> int:
        # Stats counts every gateway's requests but is up to one poll old; ours are exact. So: ours now,
        # plus what Stats saw beyond ours at the time.
        others = max(0, self.running + self.waiting - self.in_flight_at_stats)
        return self.in_flight + others

    def view(self) -> ReplicaLoad:
        return ReplicaLoad(self.target, self.load, self.adapters, self.mode, self.merged_adapter)


class ReplicaSet:
    """Owns one channel per replica and the background loops that keep the set current."""

    def __init__(
        self,
        targets: list[str],
        *,
        connect_timeout_s: float,
        health_interval_s: float,
        dns_refresh_s: float,
        eject_after: int,
        drain_s: float,
        metrics: GatewayMetrics,
        resolver: Resolver = resolve_dns,
        tls: GrpcTls | None = None,
    ) -> None:
        self._tls = tls
        self._static = [t for t in targets if not t.startswith(DNS_SCHEME)]
        self._dns = [t.removeprefix(DNS_SCHEME) for t in targets if t.startswith(DNS_SCHEME)]
        self._resolved: dict[str, list[str]] = {}
        self._connect_timeout_s = connect_timeout_s
        self._health_interval_s = health_interval_s
        self._dns_refresh_s = dns_refresh_s
        self._eject_after = eject_after
        self._drain_s = drain_s
        self._metrics = metrics
        self._resolver = resolver
        self._replicas: dict[str, Replica] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas.values())

    async def start(self) -> None:
        await self.refresh_dns()
        self._spawn(self._every(lambda: self._health_interval_s, self.check_health), "inference-health")
        if self._dns:
            self._spawn(self._every(self._dns_interval, self.refresh_dns), "inference-dns")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(r.channel.close(grace=None) for r in self._replicas.values()), return_exceptions=True)
        self._replicas.clear()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _dns_interval(self) -> float:
        # While DNS has named no replica yet (pods still starting), look again at the health pace.
        return self._dns_refresh_s if self._replicas else min(self._dns_refresh_s, self._health_interval_s)

    async def _every(self, interval_s: Callable[[], float], work: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(interval_s())
            try:
                await work()
            except Exception:  # the loop must outlive any one bad round
                logger.exception("inference replica upkeep failed")

    # -- membership -------------------------------------------------------------------------------

    async def refresh_dns(self) -> None:
        """Resolve the dns:/// targets now and add or retire replicas to match."""
        for name in self._dns:
            host, _, port = name.rpartition(":")
            try:
                found = await asyncio.to_thread(self._resolver, host, int(port))
            except OSError as exc:
                logger.warning(
                    "cannot resolve inference target %s%s: %s (keeping %s)",
                    DNS_SCHEME,
                    name,
                    exc,
                    self._resolved.get(name, []),
                )
                continue
            if found:
                self._resolved[name] = found
        wanted = list(dict.fromkeys([*self._static, *(t for ts in self._resolved.values() for t in ts)]))
        for target in wanted:
            if target not in self._replicas:
                self._add(target)
        for target in [t for t in self._replicas if t not in wanted]:
            self._retire(self._replicas.pop(target))

    def _add(self, target: str) -> None:
        channel = open_channel(target, connect_timeout_s=self._connect_timeout_s, tls=self._tls)
        self._replicas[target] = Replica(
            target=target,
            channel=channel,
            stub=inference_pb2_grpc.InferenceServiceStub(channel),
            health=health_pb2_grpc.HealthStub(channel),
            in_flight_gauge=self._metrics.add_replica(target),
        )
        logger.info("inference replica %s added", target)

    def _retire(self, replica: Replica) -> None:
        """Stop routing to a replica DNS no longer lists; its open streams may finish within drain_s."""
        logger.info("inference replica %s removed (no longer in DNS)", replica.target)
        self._metrics.forget_replica(replica.target)
        self._spawn(replica.channel.close(grace=self._drain_s), f"close-{replica.target}")

    # -- health -----------------------------------------------------------------------------------

    def candidates(self, exclude: set[str]) -> list[Replica]:
        """Replicas in rotation, minus ``exclude``; if every one is ejected, all of them (better a try than a 503)."""
        remaining = [r for r in self._replicas.values() if r.target not in exclude]
        admitted = [r for r in remaining if not r.ejected]
        return admitted or remaining

    async def check_health(self) -> dict[str, bool]:
        """Poll every replica's health and Stats now; return who answered SERVING."""
        replicas = list(self._replicas.values())
        await asyncio.gather(*(self._poll(r) for r in replicas))
        return {r.target: bool(r.serving) for r in replicas}

    async def refresh(self, replica: Replica) -> None:
        """Poll one replica's health and Stats now (after it answered in a way its last Stats did not predict)."""
        await self._poll(replica)

    async def _poll(self, replica: Replica) -> None:
        health: Any
        stats: Any
        health, stats = await asyncio.gather(
            replica.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=self._connect_timeout_s),
            replica.stub.Stats(inference_pb2.StatsRequest(), timeout=self._connect_timeout_s),
            return_exceptions=True,
        )
        if isinstance(stats, inference_pb2.StatsResponse):
            replica.running, replica.waiting = stats.running, stats.waiting
            replica.in_flight_at_stats = replica.in_flight
            replica.adapters = frozenset(stats.loaded_adapters)
            replica.merge_capable = stats.merge_capable
            self.set_merge_state(replica, stats.merge_state, stats.merged_adapter, stats.merged_for_s)
        else:  # an older replica without Stats, or a failing one: route on our own counts
            # (its merge mode is kept: a mode does not change by itself, and guessing LoRA would misroute)
            replica.running = replica.waiting = replica.in_flight_at_stats = 0
            replica.adapters = frozenset()
        if isinstance(health, BaseException):
            replica.serving = False
            self.record_failure(replica, f"health check failed: {_describe(health)}")
        elif health.status == health_pb2.HealthCheckResponse.SERVING:
            replica.serving = True
            self.record_success(replica)
        else:
            replica.serving = False
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)
            self._eject(replica, f"health says {status}")

    def record_failure(self, replica: Replica, why: str) -> None:
        replica.failures += 1
        if replica.failures >= self._eject_after:
            self._eject(replica, f"{replica.failures} consecutive failures, last: {why}")

    def record_success(self, replica: Replica) -> None:
        replica.failures = 0
        if replica.ejected:
            replica.ejected = False
            self._metrics.replica_up.labels(replica=replica.target).set(1)
            logger.info("inference replica %s re-admitted: health is SERVING", replica.target)

    def _eject(self, replica: Replica, why: str) -> None:
        if replica.ejected or replica.target not in self._replicas:
            return
        replica.ejected = True
        self._metrics.replica_up.labels(replica=replica.target).set(0)
        self._metrics.replica_ejections.labels(replica=replica.target).inc()
        logger.warning("inference replica %s ejected: %s", replica.target, why)

    # -- merge mode -------------------------------------------------------------------------------

    def set_merge_state(self, replica: Replica, state: int, merged_adapter: str, merged_for_s: float = 0.0) -> None:
        """Record a replica's merge mode: from its Stats, or from a MergeAdapter call (known before the next poll)."""
        replica.merge_state, replica.merged_adapter = state, merged_adapter
        replica.merged_for_s, replica.stats_at = merged_for_s, time.monotonic()

    # -- load -------------------------------------------------------------------------------------

    def acquire(self, replica: Replica) -> None:
        replica.in_flight += 1
        replica.in_flight_gauge.set(replica.in_flight)

    def release(self, replica: Replica) -> None:
        replica.in_flight -= 1
        if self._replicas.get(replica.target) is replica:  # not retired (nor replaced by a re-added twin)
            replica.in_flight_gauge.set(replica.in_flight)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name} {exc.details() or ''}".strip()
    return repr(exc)
