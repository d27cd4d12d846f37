"""Routing across replicas: the pure scoring function, DNS discovery, and a gateway in front of three real
fake replicas showing adapter affinity, bounded load, least-loaded spread, ejection, re-admission and retry."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from lorafleet.inference.v1 import inference_pb2_grpc
from lorafleet_gateway.metrics import GatewayMetrics
from lorafleet_gateway.upstream.replicas import ReplicaSet, resolve_dns
from lorafleet_gateway.upstream.routing import ReplicaLoad, choose, load_bound, rendezvous_score
from tests.gateway.gateway_fakes import FakeInference, serve_inference
from tests.gateway.gateway_harness import BASE_MODEL, Gateway, Stack, publish_test_adapter, wait_for
from tests.gateway.test_routing import samples

CHAT = "/v1/chat/completions"


def body(model: str = BASE_MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


# -- the scoring function ---------------------------------------------------------------------------


def replicas(*loads: int, adapters: dict[int, set[str]] | None = None) -> list[ReplicaLoad]:
    return [ReplicaLoad(f"r{i}:1", load, frozenset((adapters or {}).get(i, ()))) for i, load in enumerate(loads)]


def test_base_model_goes_to_the_least_loaded_and_ties_rotate() -> None:
    assert choose(replicas(3, 1, 2), "") == (replicas(3, 1, 2)[1], "least_loaded")
    picks = [choose(replicas(0, 0, 0), "", turn=t) for t in range(6)]
    assert [p[0].target for p in picks if p] == ["r0:1", "r1:1", "r2:1"] * 2
    assert choose([], "x") is None


def test_loaded_adapter_is_preferred_within_the_bound() -> None:
    # r2 holds the adapter; it is preferred although r0 is idler ...
    pick = choose(replicas(0, 1, 2, adapters={2: {"a@1"}}), "a@1")
    assert pick is not None and pick[0].target == "r2:1" and pick[1] == "affinity"
    # ... of two holders, the less loaded one ...
    pick = choose(replicas(0, 3, 2, adapters={1: {"a@1"}, 2: {"a@1"}}), "a@1")
    assert pick is not None and pick[0].target == "r2:1"
    # ... but not past the bound: max(1.25 x avg, avg + 2) with avg counting the new request.
    assert load_bound([0, 0, 5], 1.25, 2) == pytest.approx(4.0)
    pick = choose(replicas(0, 0, 5, adapters={2: {"a@1"}}), "a@1")
    assert pick is not None and pick[0].target != "r2:1" and pick[1] == "hashed"


def test_cold_adapters_have_a_stable_home_and_spread() -> None:
    idle = replicas(0, 0, 0)
    homes = {}
    for i in range(300):
        adapter = f"tenant/adapter-{i}@v1"
        picks = {choose(idle, adapter, turn=t)[0].target for t in range(5)}  # type: ignore[index]
        assert len(picks) == 1  # whatever the rotation: one home
        homes[adapter] = picks.pop()
        best = max(idle, key=lambda r: rendezvous_score(adapter, r.target)).target
        assert homes[adapter] == best
    assert all(80 <= n <= 120 for n in Counter(homes.values()).values())  # about 100 each


def test_a_hot_adapter_spills_in_its_fixed_order() -> None:
    adapter = "t/hot@v1"
    order = [r.target for r in sorted(replicas(0, 0, 0), key=lambda r: -rendezvous_score(adapter, r.target))]
    loads = {t: 0 for t in order}
    for _ in range(6):  # six concurrent requests, nothing loaded yet
        view = [ReplicaLoad(t, loads[t]) for t in sorted(loads)]
        pick = choose(view, adapter)
        assert pick is not None
        loads[pick[0].target] += 1
    assert [loads[t] for t in order] == [4, 2, 0]  # home to the bound, then the second; never the third


# -- DNS ---------------------------------------------------------------------------------------------


def test_resolve_dns_localhost() -> None:
    assert "127.0.0.1:50051" in resolve_dns("localhost", 50051)


def test_dns_targets_follow_the_answers(gw: Stack) -> None:
    answers: dict[str, Any] = {"svc": ["10.0.0.1:7000"]}

    def resolver(host: str, port: int) -> list[str]:
        assert (host, port) == ("svc.ns.svc.cluster.local", 7000)
        answer = answers["svc"]
        if isinstance(answer, Exception):
            raise answer
        return list(answer)

    metrics = GatewayMetrics(CollectorRegistry())
    replica_set = ReplicaSet(
        ["dns:///svc.ns.svc.cluster.local:7000", "127.0.0.1:1"],
        connect_timeout_s=0.2,
        health_interval_s=60,
        dns_refresh_s=60,
        eject_after=3,
        drain_s=0.1,
        metrics=metrics,
        resolver=resolver,
    )

    async def scenario() -> list[list[str]]:
        seen = []
        await replica_set.start()
        seen.append(sorted(r.target for r in replica_set.replicas))
        answers["svc"] = ["10.0.0.1:7000", "10.0.0.2:7000"]  # a pod was added
        await replica_set.refresh_dns()
        seen.append(sorted(r.target for r in replica_set.replicas))
        answers["svc"] = ["10.0.0.2:7000"]  # one went away
        await replica_set.refresh_dns()
        seen.append(sorted(r.target for r in replica_set.replicas))
        for failure in (OSError("NXDOMAIN"), []):  # a DNS failure or an empty answer keeps what we had
            answers["svc"] = failure
            await replica_set.refresh_dns()
            seen.append(sorted(r.target for r in replica_set.replicas))
        await replica_set.close()
        return seen

    assert gw.loop.run(scenario()) == [
        ["10.0.0.1:7000", "127.0.0.1:1"],
        ["10.0.0.1:7000", "10.0.0.2:7000", "127.0.0.1:1"],
        ["10.0.0.2:7000", "127.0.0.1:1"],
        ["10.0.0.2:7000", "127.0.0.1:1"],
        ["10.0.0.2:7000", "127.0.0.1:1"],
    ]


# -- three real replicas behind one gateway ----------------------------------------------------------


class Fleet:
    def __init__(self, gw: Stack, fakes: list[FakeInference], servers: list[grpc.aio.Server]) -> None:
        self.gw, self.fakes, self.servers = gw, fakes, servers

    @property
    def targets(self) -> list[str]:
        return [f"127.0.0.1:{f.port}" for f in self.fakes]

    def counts(self) -> list[int]:
        return [len(f.requests) for f in self.fakes]

    def set_health(self, index: int, status: int) -> None:
        self.gw.loop.run(self.fakes[index].health.set("", status))

    def clear(self) -> None:
        for fake in self.fakes:
            fake.requests.clear()


@pytest.fixture
def fleet(gw: Stack) -> Iterator[Fleet]:
    fakes = [FakeInference(f"r{i}") for i in range(3)]
    servers = [gw.loop.run(serve_inference(f)) for f in fakes]
    yield Fleet(gw, fakes, servers)
    for server in servers:
        gw.loop.run(server.stop(None))


@pytest.fixture
def fleet_gateway(fleet: Fleet, extra_gateway: Callable[..., Gateway]) -> Gateway:
    return extra_gateway(fleet.targets)


def post_concurrently(gateway: Gateway, bodies: list[dict[str, Any]]) -> list[int]:
    with ThreadPoolExecutor(len(bodies)) as pool, gateway.http() as http:
        return list(pool.map(lambda b: http.post(CHAT, json=b).status_code, bodies))


def test_affinity_keeps_an_adapter_on_its_replica(
    fleet: Fleet, fleet_gateway: Gateway, gw: Stack, tmp_path: Path
) -> None:
    names = [f"affine-{i}" for i in range(10)]
    for name in names:
        publish_test_adapter(gw.store, tmp_path / name, f"default/{name}", "v1")
    with fleet_gateway.http() as http:
        for _ in range(2):
            for name in names:
                assert http.post(CHAT, json=body(name)).status_code == 200
    for name in names:
        served = [
            i for i, f in enumerate(fleet.fakes) if any(r.adapter.startswith(f"default/{name}@") for r in f.requests)
        ]
        assert len(served) == 1, (name, served)  # both requests on one replica: loaded once
    assert len([f for f in fleet.fakes if f.loaded]) >= 2  # and the adapters spread over replicas
    # Once Stats reports where each adapter is loaded, requests keep going there.
    homes = {name: next(i for i, f in enumerate(fleet.fakes) if f"default/{name}@v1" in f.loaded) for name in names}
    assert wait_for(
        lambda: all(f"default/{n}@v1" in replica_of(fleet_gateway, fleet, homes[n]).adapters for n in names)
    )
    fleet.clear()
    with fleet_gateway.http() as http:
        for name in names:
            assert http.post(CHAT, json=body(name)).status_code == 200
    for name in names:
        assert [r.adapter for r in fleet.fakes[homes[name]].requests if name in r.adapter] == [f"default/{name}@v1"]
    assert sum(fleet.counts()) == len(names)
    with fleet_gateway.http() as http:
        decisions = samples(http.get("/metrics").text, order=("reason",))
    assert decisions[("lorafleet_gateway_routing_decisions_total", "affinity")] >= len(names)


def replica_of(gateway: Gateway, fleet: Fleet, index: int) -> Any:
    target = fleet.targets[index]
    return next(r for r in gateway.app.state.services.pool.replicas if r.target == target)


def test_base_requests_spread_by_load(fleet: Fleet, fleet_gateway: Gateway) -> None:
    with fleet_gateway.http() as http:
        for _ in range(6):
            assert http.post(CHAT, json=body()).status_code == 200
    assert fleet.counts() == [2, 2, 2]  # idle replicas take turns
    fleet.clear()
    for fake in fleet.fakes:
        fake.delay_s = 0.15  # each request stays in flight ~1 s
    assert post_concurrently(fleet_gateway, [body()] * 6) == [200] * 6
    assert fleet.counts() == [2, 2, 2]  # least loaded: in-flight counts, not luck


def test_a_hot_adapter_spills_over_but_does_not_load_everywhere(
    fleet: Fleet, fleet_gateway: Gateway, gw: Stack, tmp_path: Path
) -> None:
    publish_test_adapter(gw.store, tmp_path / "hot", "default/hot", "v1")
    for fake in fleet.fakes:
        fake.delay_s = 0.15
    assert post_concurrently(fleet_gateway, [body("hot")] * 6) == [200] * 6
    counts = sorted(fleet.counts(), reverse=True)
    assert counts[0] <= 4 and counts[1] >= 2  # bounded: the home replica took its share, then spilled
    assert counts[2] == 0  # and the third replica never had to load it


def test_ejection_and_readmission(fleet: Fleet, fleet_gateway: Gateway, gw: Stack) -> None:
    # A replica whose health says NOT_SERVING (draining) leaves rotation at the next poll ...
    fleet.set_health(0, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert wait_for(lambda: replica_of(fleet_gateway, fleet, 0).ejected)
    with fleet_gateway.http() as http:
        for _ in range(6):
            assert http.post(CHAT, json=body()).status_code == 200
        assert http.get("/ready").json()["replicas"][fleet.targets[0]] is False
        metrics = samples(http.get("/metrics").text, order=("replica",))
    assert fleet.counts()[0] == 0 and fleet.counts()[1:] == [3, 3]
    assert metrics[("lorafleet_gateway_replica_up", fleet.targets[0])] == 0
    assert metrics[("lorafleet_gateway_replica_ejections_total", fleet.targets[0])] == 1
    # ... and comes back as soon as it says SERVING again.
    fleet.set_health(0, health_pb2.HealthCheckResponse.SERVING)
    assert wait_for(lambda: not replica_of(fleet_gateway, fleet, 0).ejected)
    fleet.clear()
    with fleet_gateway.http() as http:
        for _ in range(6):
            assert http.post(CHAT, json=body()).status_code == 200
    assert fleet.counts() == [2, 2, 2]


def test_dead_replica_ejected_after_consecutive_failures_and_readmitted_when_back(
    fleet: Fleet, fleet_gateway: Gateway, gw: Stack
) -> None:
    port = fleet.fakes[2].port
    gw.loop.run(fleet.servers[2].stop(None))
    # Three failed health checks (0.2 s apart) eject it.
    assert wait_for(lambda: replica_of(fleet_gateway, fleet, 2).ejected, timeout=5)
    with fleet_gateway.http() as http:
        for _ in range(4):
            assert http.post(CHAT, json=body()).status_code == 200
    assert fleet.counts()[2] == 0

    async def restart() -> grpc.aio.Server:
        server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(fleet.fakes[2], server)
        fleet.fakes[2].health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(fleet.fakes[2].health, server)
        await fleet.fakes[2].health.set("", health_pb2.HealthCheckResponse.SERVING)
        assert server.add_insecure_port(f"127.0.0.1:{port}") == port
        await server.start()
        return server

    fleet.servers[2] = gw.loop.run(restart())
    assert wait_for(lambda: not replica_of(fleet_gateway, fleet, 2).ejected, timeout=10)
    fleet.clear()
    with fleet_gateway.http() as http:
        for _ in range(6):
            assert http.post(CHAT, json=body()).status_code == 200
    assert fleet.counts()[2] >= 1


@pytest.mark.parametrize("mode", ["unavailable", "exhausted"])
def test_failure_before_first_token_is_retried_elsewhere(
    fleet: Fleet, fleet_gateway: Gateway, gw: Stack, tmp_path: Path, mode: str
) -> None:
    publish_test_adapter(gw.store, tmp_path / "r", "default/retried", "v1")
    with fleet_gateway.http() as http:
        assert http.post(CHAT, json=body("retried")).status_code == 200
        home = next(i for i, f in enumerate(fleet.fakes) if f.requests)
        fleet.fakes[home].mode = mode  # its health still says SERVING: only the call tells
        for stream in (False, True):
            response = http.post(CHAT, json=body("retried", stream=stream))
            assert response.status_code == 200
            assert " default/retried" in response.text  # the reply names the adapter
        metrics = samples(http.get("/metrics").text, order=("replica",))
    assert len(fleet.fakes[home].requests) == 3  # tried first each time (affinity) ...
    assert sum(fleet.counts()) == 5  # ... and each retry landed elsewhere
    assert metrics[("lorafleet_gateway_upstream_retries_total", fleet.targets[home])] == 2


def test_all_replicas_failing_gives_the_last_error(fleet: Fleet, fleet_gateway: Gateway) -> None:
    for fake in fleet.fakes:
        fake.mode = "exhausted"
    with fleet_gateway.http() as http:
        response = http.post(CHAT, json=body())
    assert response.status_code == 429 and response.json()["error"]["code"] == "rate_limit_exceeded"
    assert fleet.counts() == [1, 1, 1]  # 1 try + 2 retries, each on another replica


def test_stalled_stream_ends_with_an_error_event(
    fleet: Fleet, gw: Stack, extra_gateway: Callable[..., Gateway]
) -> None:
    gateway = extra_gateway(fleet.targets[:1], stream_idle_timeout_s=0.3)
    fleet.fakes[0].delay_s = 0.6  # the first chunk comes in time (first_token_timeout 5 s), then nothing for 0.6 s
    with gateway.http() as http, http.stream("POST", CHAT, json=body(stream=True)) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "timeout" and "sent nothing for 0.3s" in error["message"]
    assert wait_for(lambda: fleet.fakes[0].cancelled == 1)  # and the upstream call was cancelled


def test_dns_target_through_the_gateway(fleet: Fleet, extra_gateway: Callable[..., Gateway]) -> None:
    gateway = extra_gateway([f"dns:///localhost:{fleet.fakes[1].port}"])
    with gateway.http() as http:
        assert http.post(CHAT, json=body()).status_code == 200
        assert http.get("/ready").json()["replicas"] == {fleet.targets[1]: True}
    assert fleet.counts() == [0, 1, 0]
