"""Replica selection, retry, failures mid-stream, timeouts, client disconnects, /ready and /metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.gateway_harness import BASE_MODEL, Gateway, Stack, wait_for

OK_BODY = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}]}


def test_round_robin_over_healthy_replicas(gw: Stack, client: openai.OpenAI) -> None:
    for _ in range(6):
        client.chat.completions.create(**OK_BODY)  # type: ignore[arg-type]
    assert [len(r.requests) for r in gw.replicas] == [3, 3]


def test_retry_on_another_replica_when_one_is_unavailable(gw: Stack, client: openai.OpenAI) -> None:
    failing, healthy = gw.replicas
    failing.mode = "unavailable"  # health still says SERVING: only the call tells the truth
    for stream in (False, True, False, True):
        response = client.chat.completions.create(**OK_BODY, stream=stream)  # type: ignore[call-overload]
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in response if c.choices)
        else:
            text = response.choices[0].message.content
        assert text == "Hello from base choice0. Bye!"
    assert len(healthy.requests) == 4
    assert len(failing.requests) >= 1
    with gw.gateway.http() as http:
        metrics = http.get("/metrics").text
    assert samples(metrics)[("lorafleet_gateway_upstream_errors_total", f"127.0.0.1:{failing.port}")] >= 1


def test_dead_replica_is_skipped(
    gw: Stack, extra_gateway: Callable[..., Gateway], unused_port: Callable[[], int]
) -> None:
    dead = f"127.0.0.1:{unused_port()}"
    gateway = extra_gateway([dead, gw.targets[0]])
    client = gateway.client()
    for _ in range(4):
        assert client.chat.completions.create(**OK_BODY).choices[0].message.content  # type: ignore[arg-type]
    assert len(gw.replicas[0].requests) == 4
    with gateway.http() as http:
        ready = http.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["replicas"] == {dead: False, gw.targets[0]: True}


def test_no_replica_up_is_503_and_not_ready(
    gw: Stack, extra_gateway: Callable[..., Gateway], unused_port: Callable[[], int]
) -> None:
    gateway = extra_gateway([f"127.0.0.1:{unused_port()}"])
    with gateway.http() as http:
        response = http.post("/v1/chat/completions", json=OK_BODY)
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "server_error"
        assert http.get("/ready").status_code == 503
        assert http.get("/health").status_code == 200


def sse_events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def test_mid_stream_failure_ends_with_error_event(gw: Stack, client: openai.OpenAI) -> None:
    for replica in gw.replicas:
        replica.mode = "fail_midstream"
    started = time.monotonic()
    with gw.gateway.http() as http, http.stream("POST", "/v1/chat/completions", json={**OK_BODY, "stream": True}) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert time.monotonic() - started < 5  # never a hang
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "engine crashed" in error["message"]
    contents = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-2]]
    assert contents == ["", "Hello", " from"]  # role chunk, then the two chunks sent before the crash

    with pytest.raises(openai.APIError, match="engine crashed"):
        for _ in client.chat.completions.create(**OK_BODY, stream=True):  # type: ignore[call-overload]
            pass
    with pytest.raises(openai.APIStatusError) as caught:  # non-stream: a plain 502
        client.chat.completions.create(**OK_BODY)  # type: ignore[arg-type]
    assert caught.value.status_code == 502


def test_client_disconnect_cancels_upstream_stream(gw: Stack) -> None:
    for replica in gw.replicas:
        replica.delay_s = 0.3
    with (
        gw.gateway.http() as http,
        http.stream("POST", "/v1/completions", json={"model": BASE_MODEL, "prompt": "x", "stream": True}) as r,
    ):
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # got the first chunk; now walk away
    assert wait_for(lambda: sum(r.cancelled for r in gw.replicas) == 1)


def test_client_disconnect_cancels_upstream_non_stream(gw: Stack) -> None:
    for replica in gw.replicas:
        replica.delay_s = 0.3
    with gw.gateway.http() as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=OK_BODY, timeout=0.8)
    assert wait_for(lambda: sum(r.cancelled for r in gw.replicas) == 1)


def test_first_token_timeout_504(gw: Stack, extra_gateway: Callable[..., Gateway]) -> None:
    for replica in gw.replicas:
        replica.delay_s = 2.0
    gateway = extra_gateway(gw.targets, first_token_timeout_s=0.3)
    started = time.monotonic()
    with gateway.http() as http:
        response = http.post("/v1/chat/completions", json=OK_BODY)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"
    assert time.monotonic() - started < 1.5
    assert wait_for(lambda: sum(r.cancelled for r in gw.replicas) == 1)


def test_metrics_and_health(gw: Stack, client: openai.OpenAI) -> None:
    client.chat.completions.create(**OK_BODY)  # type: ignore[arg-type]
    client.completions.create(model="self-cognition", prompt="x")
    with gw.gateway.http() as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/ready").status_code == 200
        text = http.get("/metrics").text
    values = samples(text)
    assert values[("lorafleet_gateway_requests_total", "/v1/chat/completions", "base", "200")] >= 1
    assert values[("lorafleet_gateway_requests_total", "/v1/completions", "adapter", "200")] >= 1
    assert values[("lorafleet_gateway_time_to_first_token_seconds_count", "adapter")] >= 1
    assert values[("lorafleet_gateway_request_seconds_count", "/v1/chat/completions")] >= 1
    by_model = samples(text, order=("route", "tenant", "model", "status"))
    assert by_model[("lorafleet_gateway_requests_total", "/v1/chat/completions", "default", BASE_MODEL, "200")] >= 1
    assert by_model[("lorafleet_gateway_requests_total", "/v1/completions", "default", "self-cognition", "200")] >= 1


def test_disconnects_are_counted_as_499(gw: Stack) -> None:
    for replica in gw.replicas:
        replica.delay_s = 0.3
    with gw.gateway.http() as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=OK_BODY, timeout=0.5)
    key = ("lorafleet_gateway_requests_total", "/v1/chat/completions", "base", "499")

    def counted() -> bool:
        with gw.gateway.http() as http:
            return samples(http.get("/metrics").text).get(key, 0) >= 1

    assert wait_for(counted)


def samples(text: str, order: tuple[str, ...] = ("route", "model_kind", "status", "replica")) -> dict[tuple, float]:
    """Metric samples keyed by (name, values of the labels in ``order``), summed over the other labels."""
    totals: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, *(sample.labels[k] for k in order if k in sample.labels))
            totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def test_replica_slots_are_released_however_requests_end(gw: Stack, client: openai.OpenAI) -> None:
    """In-flight counts drive routing: every way a request can end must give its slot back."""
    client.chat.completions.create(**OK_BODY)  # type: ignore[arg-type]
    list(client.chat.completions.create(**OK_BODY, stream=True))  # type: ignore[call-overload]
    for replica in gw.replicas:
        replica.delay_s = 0.2
    with gw.gateway.http() as http, http.stream("POST", "/v1/chat/completions", json={**OK_BODY, "stream": True}) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))  # walk away mid-stream
    with gw.gateway.http() as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=OK_BODY, timeout=0.5)  # walk away before the answer
    for replica in gw.replicas:
        replica.delay_s, replica.mode = 0.0, "fail_midstream"
    with gw.gateway.http() as http:
        http.post("/v1/chat/completions", json={**OK_BODY, "stream": True})
        http.post("/v1/chat/completions", json=OK_BODY)
    for replica in gw.replicas:
        replica.mode = "invalid"
    with gw.gateway.http() as http:
        assert http.post("/v1/chat/completions", json=OK_BODY).status_code == 400
    pool = gw.gateway.app.state.services.pool
    assert wait_for(lambda: all(r.in_flight == 0 for r in pool.replicas) and not pool.streams)
