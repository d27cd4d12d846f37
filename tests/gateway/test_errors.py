"""Every error path answers with an OpenAI error body, and the gateway stays healthy afterwards."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.gateway.gateway_harness import ADAPTER, ADMIN_KEY, BASE_MODEL, Stack

CHAT = "/v1/chat/completions"
OK_BODY = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}]}


def assert_error(response: Any, status: int, type_: str, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == type_
    assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def assert_still_healthy(gw: Stack) -> None:
    with gw.gateway.http() as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.post(CHAT, json=OK_BODY).status_code == 200


def test_unknown_model_404(gw: Stack, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_found"
    with gw.gateway.http() as http:
        for path, body in ((CHAT, {**OK_BODY, "model": "nope"}), ("/v1/completions", {"model": "nope", "prompt": "x"})):
            error = assert_error(http.post(path, json=body), 404, "invalid_request_error", "model_not_found", "model")
            assert "nope" in error["message"]
    assert gw.all_requests() == []  # resolved at the gateway, never sent upstream
    assert_still_healthy(gw)


def test_missing_and_wrong_key_401(gw: Stack) -> None:
    with gw.gateway.http(authorized=False) as http:
        assert_error(http.post(CHAT, json=OK_BODY), 401, "invalid_request_error", "invalid_api_key")
        assert_error(http.get("/v1/models"), 401, "invalid_request_error", "invalid_api_key")
        wrong = {"Authorization": "Bearer not-the-key"}
        assert_error(http.get("/v1/models", headers=wrong), 401, "invalid_request_error", "invalid_api_key")
        basic = {"Authorization": f"Basic {ADMIN_KEY}"}
        assert_error(http.get("/v1/models", headers=basic), 401, "invalid_request_error", "invalid_api_key")
        # The key is checked before the body is: no schema hints for strangers.
        assert_error(http.post(CHAT, content=b"{not json"), 401, "invalid_request_error", "invalid_api_key")
        response = http.get("/v1/models", headers=wrong)
        assert "not-the-key" not in response.text
    with pytest.raises(openai.AuthenticationError):
        gw.gateway.client(api_key="wrong").models.list()
    assert_still_healthy(gw)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": BASE_MODEL, "messages": []}, "messages"),
        ({"model": BASE_MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"model": BASE_MODEL, "messages": [{"role": "tool", "content": "hi"}]}, "messages[0].role"),
        ({"model": BASE_MODEL, "messages": "hi"}, "messages"),
        ({"model": BASE_MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": BASE_MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None),
        ({**OK_BODY, "n": 0}, "n"),
        ({**OK_BODY, "max_tokens": 0}, "max_tokens"),
        ({**OK_BODY, "max_tokens": "many"}, "max_tokens"),
        ({**OK_BODY, "temperature": "hot"}, "temperature"),
        ({**OK_BODY, "temperature": 3}, "temperature"),
        ({**OK_BODY, "stop": 5}, "stop"),
        ({**OK_BODY, "stream_options": {"include_usage": True}}, None),
        ({**OK_BODY, "top_logprobs": 2}, None),
        ({"messages": OK_BODY["messages"]}, "model"),
        ([1, 2], None),
    ],
)
def test_invalid_chat_requests_400(gw: Stack, body: Any, param: str | None) -> None:
    with gw.gateway.http() as http:
        error = assert_error(http.post(CHAT, json=body), 400, "invalid_request_error", None)
    if param is not None:
        assert error["param"] == param
    assert gw.all_requests() == []


@pytest.mark.parametrize(
    "body",
    [
        {"model": BASE_MODEL, "prompt": ["a", "b"]},
        {"model": BASE_MODEL, "prompt": [1, 2, 3]},
        {"model": BASE_MODEL, "prompt": "x", "echo": True},
        {"model": BASE_MODEL, "prompt": "x", "logprobs": 9},
        {"model": BASE_MODEL},
    ],
)
def test_invalid_completion_requests_400(gw: Stack, body: dict[str, Any]) -> None:
    with gw.gateway.http() as http:
        assert_error(http.post("/v1/completions", json=body), 400, "invalid_request_error")


def test_malformed_json_400_and_openai_client_sees_bad_request(gw: Stack, client: openai.OpenAI) -> None:
    with gw.gateway.http() as http:
        headers = {"Content-Type": "application/json"}
        error = assert_error(http.post(CHAT, content=b'{"model": ', headers=headers), 400, "invalid_request_error")
        assert "JSON" in error["message"]
        assert_error(http.post(CHAT, content=b""), 400, "invalid_request_error")
        form = http.post(CHAT, data={"model": BASE_MODEL})  # a form, not JSON
        assert "must be a JSON object" in assert_error(form, 400, "invalid_request_error")["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=BASE_MODEL, messages=[])
    assert_still_healthy(gw)


def test_body_too_large_413(gw: Stack) -> None:
    body = {**OK_BODY, "messages": [{"role": "user", "content": "x" * 300_000}]}
    with gw.gateway.http() as http:
        assert_error(http.post(CHAT, json=body), 413, "invalid_request_error", "request_too_large")

        def chunked() -> Any:  # no Content-Length: the limit is enforced while reading
            yield b'{"model": "m", "messages": [{"role": "user", "content": "'
            for _ in range(40):
                yield b"y" * 10_000
            yield b'"}]}'

        response = http.post(CHAT, content=chunked(), headers={"Content-Type": "application/json"})
        assert_error(response, 413, "invalid_request_error", "request_too_large")
    assert_still_healthy(gw)


@pytest.mark.parametrize(
    ("mode", "status", "type_", "code"),
    [
        ("not_found", 404, "invalid_request_error", "model_not_found"),
        ("invalid", 400, "invalid_request_error", None),
        ("rejected", 400, "invalid_request_error", "adapter_rejected"),
        ("exhausted", 429, "rate_limit_error", "rate_limit_exceeded"),
        ("unavailable", 503, "server_error", "service_unavailable"),
    ],
)
def test_upstream_status_mapping(gw: Stack, mode: str, status: int, type_: str, code: str | None) -> None:
    for replica in gw.replicas:
        replica.mode = mode
    with gw.gateway.http() as http:
        error = assert_error(http.post(CHAT, json={**OK_BODY, "model": ADAPTER}), status, type_, code)
        stream = assert_error(http.post(CHAT, json={**OK_BODY, "stream": True}), status, type_, code)
    assert stream["message"] == error["message"] or status == 503
    gw.reset()
    assert_still_healthy(gw)


def test_unknown_route_and_method(gw: Stack) -> None:
    with gw.gateway.http() as http:
        assert_error(http.get("/v1/nothing-here"), 404, "invalid_request_error")
        assert_error(http.get(CHAT), 405, "invalid_request_error")
