"""The generation routes' fast path (generation/fast_path.py) answers exactly as the FastAPI app behind it.

Each request goes to the stack's gateway and to a second gateway of the same settings whose app has the
fast path switched off (FastAPI's router, dependencies and handlers only, as before it existed), both
real uvicorn servers over the same fake replicas; status, headers that matter and bodies must agree.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from lorafleet_gateway.app import create_app
from lorafleet_gateway.deps import GatewayDeps
from tests.gateway.gateway_harness import ADAPTER, ADMIN_KEY, BASE_MODEL, Gateway, Stack, gateway_settings, stop_gateway

pytestmark = pytest.mark.timeout(120)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
CHAT_BODY = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}]}
COMPLETION_BODY = {"model": BASE_MODEL, "prompt": "Once upon a time"}
JSON = {"content-type": "application/json"}
# What differs between two answers to one request by design: ids, creation times.
_VOLATILE = re.compile(rb'"(id|created)":("[^"]*"|\d+)')


@pytest.fixture
def plain(gw: Stack) -> Iterator[Gateway]:
    """A gateway like the stack's, with the fast path switched off."""

    async def start() -> Gateway:
        settings = gateway_settings(gw.store.root, gw.targets, gw.trainer_target)
        registry = CollectorRegistry()
        app = create_app(settings, GatewayDeps(store=gw.store, registry=registry))
        app.fast_path = None
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, log_level="warning", lifespan="on")
        server = uvicorn.Server(config)
        task = gw.loop.loop.create_task(server.serve())
        while not server.started:
            assert not task.done(), "gateway did not start"
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        return Gateway(url=f"http://127.0.0.1:{port}", app=app, server=server, task=task, registry=registry)

    gateway = gw.loop.run(start())
    yield gateway
    gw.loop.run(stop_gateway(gateway))


def both(
    gw: Stack, plain: Gateway, method: str, path: str, chunks: list[bytes] | None = None, **kwargs: Any
) -> tuple[httpx.Response, httpx.Response]:
    """The same request to the stack's gateway and to ``plain``; ``chunks`` is sent without a Content-Length."""
    answers = []
    for gateway in (gw.gateway, plain):
        if chunks is not None:
            kwargs["content"] = iter(chunks)  # an iterator: httpx sends it chunked
        with httpx.Client(base_url=gateway.url, timeout=15) as http:
            answers.append(http.request(method, path, **kwargs))
    return answers[0], answers[1]


def assert_same(fast: httpx.Response, slow: httpx.Response, status: int) -> None:
    assert (fast.status_code, slow.status_code) == (status, status), (fast.text, slow.text)
    assert _VOLATILE.sub(b"", fast.content) == _VOLATILE.sub(b"", slow.content)
    for header in ("content-type", "www-authenticate", "allow", "retry-after"):
        assert fast.headers.get(header) == slow.headers.get(header), header


def bearer(key: str = ADMIN_KEY, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


@pytest.mark.parametrize(
    ("path", "headers", "content", "status"),
    [
        pytest.param(CHAT, bearer(**JSON), b"{not json", 400, id="bad-json"),
        pytest.param(CHAT, bearer(**JSON), b"", 400, id="empty-body"),
        pytest.param(CHAT, bearer(**JSON), b"[]", 400, id="not-an-object"),
        pytest.param(CHAT, bearer(**{"content-type": "text/plain"}), json.dumps(CHAT_BODY).encode(), 400, id="text"),
        pytest.param(CHAT, bearer(), json.dumps(CHAT_BODY).encode(), 400, id="no-content-type"),
        pytest.param(CHAT, JSON, json.dumps(CHAT_BODY).encode(), 401, id="no-key"),
        pytest.param(CHAT, JSON, b"{not json", 401, id="no-key-bad-json"),
        pytest.param(CHAT, bearer("lf-wrong", **JSON), json.dumps(CHAT_BODY).encode(), 401, id="wrong-key"),
        pytest.param(CHAT, {"Authorization": f"Basic {ADMIN_KEY}", **JSON}, b"{}", 401, id="basic-auth"),
        pytest.param(CHAT, bearer(**JSON), json.dumps({**CHAT_BODY, "n": 0}).encode(), 400, id="n-0"),
        pytest.param(CHAT, bearer(**JSON), json.dumps({"model": BASE_MODEL}).encode(), 400, id="no-messages"),
        pytest.param(CHAT, bearer(**JSON), json.dumps({**CHAT_BODY, "stream_options": {}}).encode(), 400, id="opts"),
        pytest.param(
            CHAT,
            bearer(**JSON),
            b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}' % BASE_MODEL.encode(),
            400,
            id="lone-surrogate",
        ),
        pytest.param(CHAT, bearer(**JSON), json.dumps({**CHAT_BODY, "model": "nope"}).encode(), 404, id="no-model"),
        pytest.param(
            CHAT,
            bearer(**JSON),
            json.dumps({**CHAT_BODY, "messages": [{"role": "user", "content": "x" * 100_001}]}).encode(),
            400,
            id="prompt-too-long",
        ),
        pytest.param(CHAT, bearer(**JSON), json.dumps({**CHAT_BODY, "x": 1}).encode(), 200, id="unknown-field"),
        pytest.param(
            CHAT, bearer(**{"content-type": "application/json; charset=utf-8"}), json.dumps(CHAT_BODY).encode(), 200
        ),
        pytest.param(CHAT, bearer(**JSON), json.dumps({**CHAT_BODY, "n": 2, "logprobs": True}).encode(), 200),
        pytest.param(CHAT, bearer(**JSON), json.dumps({**CHAT_BODY, "model": ADAPTER}).encode(), 200, id="adapter"),
        pytest.param(CHAT, bearer(**JSON), b"x" * (256 * 1024 + 1), 413, id="over-limit"),
        pytest.param(COMPLETIONS, bearer(**JSON), json.dumps(COMPLETION_BODY).encode(), 200, id="completion"),
        pytest.param(COMPLETIONS, bearer(**JSON), json.dumps({**COMPLETION_BODY, "echo": True}).encode(), 400),
        pytest.param(COMPLETIONS, JSON, b"{not json", 401, id="completion-no-key"),
        pytest.param(CHAT + "/", bearer(**JSON), json.dumps(CHAT_BODY).encode(), 307, id="trailing-slash"),
    ],
)
def test_post_answers_as_fastapi(
    gw: Stack, plain: Gateway, path: str, headers: dict[str, str], content: bytes, status: int
) -> None:
    fast, slow = both(gw, plain, "POST", path, headers=headers, content=content, follow_redirects=False)
    assert_same(fast, slow, status)


@pytest.mark.parametrize("stream_body", [{"stream": True}, {"stream": True, "stream_options": {"include_usage": True}}])
@pytest.mark.parametrize(("path", "body"), [(CHAT, CHAT_BODY), (COMPLETIONS, COMPLETION_BODY)])
def test_streams_as_fastapi(
    gw: Stack, plain: Gateway, path: str, body: dict[str, Any], stream_body: dict[str, Any]
) -> None:
    fast, slow = both(gw, plain, "POST", path, headers=bearer(), json={**body, **stream_body})
    assert_same(fast, slow, 200)
    assert fast.content.endswith(b"data: [DONE]\n\n")


def test_chunked_body_goes_to_fastapi(gw: Stack, plain: Gateway) -> None:
    # No Content-Length: the body-limit middleware must watch it, so the fast path hands it over.
    fast, slow = both(gw, plain, "POST", CHAT, headers=bearer(**JSON), chunks=[json.dumps(CHAT_BODY).encode()])
    assert_same(fast, slow, 200)
    over = [b"x" * 200_000, b"x" * 200_000]
    fast, slow = both(gw, plain, "POST", CHAT, headers=bearer(**JSON), chunks=over)
    assert_same(fast, slow, 413)


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE"])
@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_other_methods_405(gw: Stack, plain: Gateway, method: str, path: str) -> None:
    fast, slow = both(gw, plain, method, path, headers=bearer())
    assert_same(fast, slow, 405)
    assert fast.headers["allow"] == "POST"


def test_a_handed_over_request_is_counted_once(gw: Stack) -> None:
    """The fast path decides before authenticating: a body it hands to FastAPI takes one request from the key's
    RPM (FastAPI's dependency), not two."""
    tenant = gw.new_tenant()
    key = gw.new_key(tenant, rpm_limit=2)["key"]
    with gw.gateway.http(api_key=key) as http:
        assert http.post(CHAT, json={**CHAT_BODY, "n": 0}).status_code == 400  # FastAPI: admitted, then invalid
        assert http.post(CHAT, json=CHAT_BODY).status_code == 200  # fast path
        limited = http.post(CHAT, json=CHAT_BODY)
    assert limited.status_code == 429, limited.text
    assert limited.json()["error"]["type"] == "requests"


def request_counts(registry: CollectorRegistry) -> dict[tuple[tuple[str, str], ...], float]:
    """lorafleet_gateway_requests_total and the request-time histogram's counts, by their labels."""
    counts = {}
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name in ("lorafleet_gateway_requests_total", "lorafleet_gateway_request_seconds_count"):
                counts[(("name", sample.name), *sorted(sample.labels.items()))] = sample.value
    return counts


def test_fast_path_requests_are_counted_like_fastapi(gw: Stack, plain: Gateway) -> None:
    before = request_counts(gw.gateway.registry)
    both(gw, plain, "POST", CHAT, headers=bearer(), json=CHAT_BODY)
    both(gw, plain, "POST", CHAT, headers=bearer(), json={**CHAT_BODY, "stream": True})
    both(gw, plain, "POST", CHAT, headers=bearer(**JSON), content=b"{not json")
    both(gw, plain, "POST", CHAT, headers=JSON, json=CHAT_BODY)
    both(gw, plain, "POST", COMPLETIONS, headers=bearer(), json={**COMPLETION_BODY, "model": "nope"})
    after = request_counts(gw.gateway.registry)
    added = {labels: value - before.get(labels, 0) for labels, value in after.items()}
    expected = request_counts(plain.registry)
    assert {k: v for k, v in added.items() if v} == expected
    assert (
        ("name", "lorafleet_gateway_requests_total"),
        ("model", BASE_MODEL),
        ("model_kind", "base"),
        ("route", CHAT),
        ("status", "200"),
        ("tenant", "default"),
    ) in expected
