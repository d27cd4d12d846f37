"""Per-key limits: requests and tokens per minute (429 + Retry-After), prompt length (400), body size (413)."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from prometheus_client import CollectorRegistry

from lorafleet_gateway.auth import Principal
from lorafleet_gateway.errors import RequestRateLimited, TokenRateLimited
from lorafleet_gateway.metrics import GatewayMetrics
from lorafleet_gateway.quotas import RateLimiter, estimate_tokens
from tests.gateway.gateway_harness import BASE_MODEL, Stack
from tests.gateway.test_routing import samples

CHAT = "/v1/chat/completions"
# The fake counts 3 prompt tokens ("hello there" + role) and answers 7 completion tokens.
BODY = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "hello there"}]}


def rate_limit_error(response: Any, type_: str) -> int:
    assert response.status_code == 429, response.text
    assert response.json() == {
        "error": {
            "message": response.json()["error"]["message"],
            "type": type_,
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    retry_after = int(response.headers["retry-after"])
    assert retry_after >= 1
    return retry_after


def test_requests_per_minute(gw: Stack) -> None:
    key = gw.new_key(gw.new_tenant(), rpm_limit=2)
    with gw.gateway.http(api_key=key["key"]) as http:
        assert http.post(CHAT, json=BODY).status_code == 200
        assert http.get("/v1/models").status_code == 200  # every data-plane request counts
        third = http.post(CHAT, json=BODY)
        # 2 per minute: one request back every 30 s.
        assert 25 <= rate_limit_error(third, "requests") <= 30
        assert "requests per min" in third.json()["error"]["message"]
    with pytest.raises(openai.RateLimitError) as caught:
        gw.gateway.client(api_key=key["key"]).models.list()
    assert caught.value.code == "rate_limit_exceeded"
    assert len(gw.all_requests()) == 1  # rejected requests never reach a replica
    with gw.gateway.http() as admin:  # the admin key has no limit; the rejections are counted
        for _ in range(3):
            assert admin.post(CHAT, json=BODY).status_code == 200
        metrics = samples(admin.get("/metrics").text, order=("tenant", "limit"))
    assert metrics[("lorafleet_gateway_rate_limited_total", key["tenant_id"], "requests")] == 2


def test_tokens_per_minute(gw: Stack) -> None:
    key = gw.new_key(gw.new_tenant(), tpm_limit=10)
    with gw.gateway.http(api_key=key["key"]) as http:
        first = http.post(CHAT, json=BODY)
        assert first.status_code == 200 and first.json()["usage"]["total_tokens"] == 10  # the whole allowance
        second = http.post(CHAT, json=BODY)
        assert 1 <= rate_limit_error(second, "tokens") <= 6  # 10 per minute: one token back every 6 s
        streamed = http.post(CHAT, json={**BODY, "stream": True})
        rate_limit_error(streamed, "tokens")  # before any stream starts: a plain 429


def test_streamed_usage_is_charged_when_the_stream_ends(gw: Stack) -> None:
    key = gw.new_key(gw.new_tenant(), tpm_limit=10)
    client = gw.gateway.client(api_key=key["key"])
    chunks = list(client.chat.completions.create(**BODY, stream=True))  # type: ignore[call-overload]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from base choice0. Bye!"
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(**BODY)  # type: ignore[arg-type]


def test_limits_inherit_from_tenant_and_keys_override(gw: Stack) -> None:
    tenant = gw.new_tenant(rpm_limit=1)
    key = gw.new_key(tenant)
    with gw.gateway.http(api_key=key["key"]) as http:
        assert http.get("/v1/models").status_code == 200
        assert http.get("/v1/models").status_code == 429  # the tenant's limit
    with gw.gateway.http() as admin:
        updated = admin.patch(f"/v1/admin/keys/{key['id']}", json={"rpm_limit": 1000}).json()
        assert updated["rpm_limit"] == 1000
    with gw.gateway.http(api_key=key["key"]) as http:
        assert http.get("/v1/models").status_code == 200  # the key's own limit, at once
    other = gw.new_key(tenant)  # limits are per key: a second key has its own allowance
    with gw.gateway.http(api_key=other["key"]) as http:
        assert http.get("/v1/models").status_code == 200


def test_prompt_too_long_400(gw: Stack) -> None:
    # The stack allows 100_000 prompt characters (well under its 256 KiB body limit).
    long_chat = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "x" * 60_000}] * 2}
    with gw.gateway.http() as http:
        for path, body, param in (
            (CHAT, long_chat, "messages"),
            ("/v1/completions", {"model": BASE_MODEL, "prompt": "y" * 100_001}, "prompt"),
        ):
            response = http.post(path, json=body)
            assert response.status_code == 400
            error = response.json()["error"]
            assert (error["code"], error["param"], error["type"]) == (
                "context_length_exceeded",
                param,
                "invalid_request_error",
            )
        assert http.post(CHAT, json={**long_chat, "messages": long_chat["messages"][:1]}).status_code == 200
    assert len(gw.all_requests()) == 1


def test_oversize_body_413_for_tenant_keys_too(gw: Stack) -> None:
    key = gw.new_key(gw.new_tenant())
    with gw.gateway.http(api_key=key["key"]) as http:
        big = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "x" * 300_000}]}
        response = http.post(CHAT, json=big)
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
        assert http.post(CHAT, json=BODY).status_code == 200


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_buckets_refill_and_settle() -> None:
    clock = Clock()
    limiter = RateLimiter(GatewayMetrics(CollectorRegistry()), clock=clock)
    key = Principal(subject="key_1", tenant="t", rpm_limit=60, tpm_limit=600)
    for _ in range(60):
        limiter.admit_request(key)
    with pytest.raises(RequestRateLimited) as caught:
        limiter.admit_request(key)
    assert caught.value.headers == {"Retry-After": "1", "x-ratelimit-limit-requests": "60"}
    clock.now += 1.0  # one request per second refills
    limiter.admit_request(key)

    limiter.admit_tokens(key, estimate_tokens(4000))  # 1001 estimated: into debt, admitted all the same
    with pytest.raises(TokenRateLimited) as tokens:
        limiter.admit_tokens(key, 1)
    assert tokens.value.headers is not None and tokens.value.headers["Retry-After"] == "41"  # 401 tokens at 10/s
    limiter.charge_tokens(key, -1001 + 100)  # the exact usage was only 100 tokens
    limiter.admit_tokens(key, 1)

    unlimited = Principal(subject="admin", is_admin=True)
    for _ in range(1000):
        limiter.admit_request(unlimited)
        limiter.admit_tokens(unlimited, 10**6)


def test_a_changed_limit_applies_to_what_the_key_has_used_at_once() -> None:
    clock = Clock()
    limiter = RateLimiter(GatewayMetrics(CollectorRegistry()), clock=clock)
    throttled = Principal(subject="key_1", tenant="t", rpm_limit=1)
    limiter.admit_request(throttled)
    with pytest.raises(RequestRateLimited):
        limiter.admit_request(throttled)
    raised = Principal(subject="key_1", tenant="t", rpm_limit=1000)  # the admin raised it: no time has passed
    for _ in range(999):  # the one request already made counts against the new minute's allowance
        limiter.admit_request(raised)
    with pytest.raises(RequestRateLimited):
        limiter.admit_request(raised)
    lowered = Principal(subject="key_1", tenant="t", rpm_limit=10)
    clock.now += 30.0  # half a minute at the new limit's pace: 5 requests back
    for _ in range(5):
        limiter.admit_request(lowered)
    with pytest.raises(RequestRateLimited):
        limiter.admit_request(lowered)
