"""The gateway's per-request and per-token fast paths keep the behaviour they replaced.

* Streamed events are rendered from pre-encoded parts (chat/view.py, completions/view.py): byte for byte
  what encoding each whole chunk object gives (the reference below is the encoding they replaced).
* The role event and the first token leave as soon as the first chunk is there, not with a later one
  (and under the same headers as before).
* A key revoked through one gateway stops working on another within that one's auth cache time.
* uvicorn runs on uvloop and httptools, without an access log unless asked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import uvloop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from lorafleet.inference.v1 import inference_pb2
from lorafleet_gateway.chat.schemas import ChatCompletionRequest
from lorafleet_gateway.chat.view import ChatView, chat_logprobs
from lorafleet_gateway.completions.schemas import CompletionRequest
from lorafleet_gateway.completions.view import CompletionView, completion_logprobs
from lorafleet_gateway.errors import ServiceUnavailable, UpstreamFailed
from lorafleet_gateway.generation.aggregate import UsageTracker, check_index, finish_reason
from lorafleet_gateway.main import uvicorn_config
from tests.gateway.gateway_harness import ADMIN_KEY, BASE_MODEL, Gateway, Stack, gateway_settings, wait_for

pytestmark = pytest.mark.timeout(120)

TEXTS = [
    "Hello",
    " wörld",
    'a "quote", a \\ backslash',
    "line\nbreak\ttab\r",
    "\x01\x1f",
    "🎉 中文",
    "\u2028\u2029",
    "</",
]
MODELS = [BASE_MODEL, 'odd "model" ünï\n/v2']


def chunk(index: int, text: str, finish: str = "", logprobs: int | None = None) -> inference_pb2.GenerateChunk:
    made = inference_pb2.GenerateChunk(index=index, text=text, token_count=1, finish_reason=finish)
    if logprobs is not None:
        top = [inference_pb2.TopLogprob(token=f"alt{k}", logprob=-1.5 - k) for k in range(logprobs)]
        made.logprobs.append(inference_pb2.TokenLogprob(token=text or "x", logprob=-0.125, top=top))
    return made


def stream(n: int, logprobs: int | None) -> list[inference_pb2.GenerateChunk]:
    chunks = [chunk(i % n, text, logprobs=logprobs) for i, text in enumerate(TEXTS)]
    chunks.append(inference_pb2.GenerateChunk(index=0, token_count=0))  # shows nothing: no event
    chunks += [chunk(i, "", "length" if i else "stop") for i in range(n)]  # finish without text
    chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens = 11, len(TEXTS)
    return chunks


def encoded(events: list[dict[str, Any]]) -> bytes:
    return b"".join(f"data: {json.dumps(e, separators=(',', ':'), ensure_ascii=False)}\n\n".encode() for e in events)


def reference_chat(view: ChatView, chunks: list[inference_pb2.GenerateChunk]) -> bytes:
    """The events as the gateway rendered them before: a dict per chunk, encoded whole."""
    body = view.body

    def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        made = {
            "id": view.id,
            "object": "chat.completion.chunk",
            "created": view.created,
            "model": body.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if body.include_usage:
            made["usage"] = usage
        return made

    role = {"role": "assistant", "content": ""}
    events = [event([{"index": i, "delta": role, "logprobs": None, "finish_reason": None}]) for i in range(body.n)]
    usage = UsageTracker()
    for item in chunks:
        usage.add(item)
        if item.text or item.finish_reason or item.logprobs:
            choice = {
                "index": check_index(item, body.n),
                "delta": {"content": item.text} if item.text else {},
                "logprobs": chat_logprobs(item.logprobs) if body.logprobs else None,
                "finish_reason": finish_reason(item.finish_reason),
            }
            events.append(event([choice]))
    if body.include_usage:
        events.append(event([], usage=usage.usage.as_dict()))
    return encoded(events)


def reference_completion(view: CompletionView, chunks: list[inference_pb2.GenerateChunk]) -> bytes:
    body = view.body

    def event(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": view.id,
            "object": "text_completion",
            "created": view.created,
            "model": body.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    events, offsets, usage = [], [0] * body.n, UsageTracker()
    for item in chunks:
        usage.add(item)
        if not (item.text or item.finish_reason or item.logprobs):
            continue
        index = check_index(item, body.n)
        logprobs = completion_logprobs(item.logprobs, offsets[index]) if body.logprobs is not None else None
        offsets[index] += len(item.text)
        made = event(
            [
                {
                    "index": index,
                    "text": item.text,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason(item.finish_reason),
                }
            ]
        )
        if body.include_usage:
            made["usage"] = None
        events.append(made)
    if body.include_usage:
        events.append({**event([]), "usage": usage.usage.as_dict()})
    return encoded(events)


def rendered(view: ChatView | CompletionView, chunks: list[inference_pb2.GenerateChunk]) -> bytes:
    usage = UsageTracker()
    for item in chunks:
        usage.add(item)
    return view.opening() + b"".join(view.render(item) for item in chunks) + view.closing(usage.usage)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("logprobs", [None, 0, 2])
def test_stream_events_are_the_encoding_of_whole_chunk_objects(
    model: str, n: int, include_usage: bool, logprobs: int | None
) -> None:
    stream_options = {"include_usage": True} if include_usage else None
    common = {"model": model, "n": n, "stream": True, "stream_options": stream_options}
    chat = ChatCompletionRequest.model_validate(
        {
            **common,
            "messages": [{"role": "user", "content": "hi"}],
            "logprobs": logprobs is not None,
            "top_logprobs": logprobs or None,
        }
    )
    completion = CompletionRequest.model_validate({**common, "prompt": "hi", "logprobs": logprobs})
    chunks = stream(n, logprobs)
    chat_view = ChatView("chatcmpl-0123abcd", chat)
    assert rendered(chat_view, chunks) == reference_chat(chat_view, chunks)
    completion_view = CompletionView("cmpl-0123abcd", completion)
    assert rendered(completion_view, chunks) == reference_completion(completion_view, chunks)


def test_stream_event_errors_are_the_same() -> None:
    chat = ChatView("chatcmpl-x", ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user"}]}))
    completion = CompletionView("cmpl-x", CompletionRequest.model_validate({"model": "m", "prompt": "p"}))
    for view in (chat, completion):
        with pytest.raises(ServiceUnavailable, match="aborted"):
            view.render(chunk(0, "x", "abort"))
        with pytest.raises(UpstreamFailed, match="choice 1 for a request of n=1"):
            view.render(chunk(1, "x"))


def test_role_and_first_token_leave_with_the_first_chunk(gw: Stack) -> None:
    for replica in gw.replicas:
        replica.delay_s = 0.6  # before each chunk: the first at 0.6 s, the second at 1.2 s
    body = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    seen: list[tuple[float, dict[str, Any]]] = []
    started = time.monotonic()
    with gw.gateway.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert (response.headers["cache-control"], response.headers["x-accel-buffering"]) == ("no-cache", "no")
        for line in response.iter_lines():
            if line.startswith("data: {"):
                seen.append((time.monotonic() - started, json.loads(line[6:])))
                if len(seen) == 2:
                    break
    (role_at, role), (first_at, first) = seen
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["choices"][0]["delta"] == {"content": "Hello"}
    # Both within the first chunk's time, well before the second chunk exists (1.2 s after the start).
    assert first_at - role_at < 0.3 and first_at < 1.05, seen


def test_a_revoked_key_stops_working_on_other_gateways_within_their_auth_cache_time(
    gw: Stack, extra_gateway: Callable[..., Gateway]
) -> None:
    other = extra_gateway(gw.targets, auth_cache_s=0.5)  # same database, its own cache
    key = gw.new_key(gw.new_tenant())

    def status(gateway: Gateway) -> int:
        with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {key['key']}"}, timeout=15) as http:
            return http.get("/v1/models").status_code

    assert status(other) == 200  # now cached there
    with httpx.Client(base_url=gw.gateway.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        assert admin.delete(f"/v1/admin/keys/{key['id']}").status_code == 200
    revoked_at = time.monotonic()
    assert status(gw.gateway) == 401  # the gateway that revoked it: at once
    assert wait_for(lambda: status(other) == 401, timeout=5)
    assert time.monotonic() - revoked_at < 0.5 + 1.0  # the cache time, plus slack for a busy machine


def test_uvicorn_runs_on_uvloop_and_httptools_without_an_access_log(gw: Stack) -> None:
    settings = gateway_settings(gw.store.root, gw.targets, gw.trainer_target)
    config = uvicorn_config(settings)
    assert (config.loop, config.http, config.access_log) == ("uvloop", "httptools", False)
    config.load()
    assert config.http_protocol_class is HttpToolsProtocol
    factory = config.get_loop_factory()
    assert factory is not None
    loop = factory()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    assert uvicorn_config(settings.model_copy(update={"access_log": True})).access_log is True
