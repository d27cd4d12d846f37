"""POST /v1/chat/completions through the official openai client."""

from __future__ import annotations

import logging

import openai
import pytest

from tests.gateway.gateway_harness import ADAPTER, ADAPTER_VERSION, BASE_MODEL, Stack

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello to the fleet"},
]
# The fake's tokenizer: words + 1 per message, so the exact usage is known.
PROMPT_TOKENS = (3 + 1) + (5 + 1)
REPLY = "Hello from base choice0. Bye!"


def test_non_stream_base_model_exact_usage(gw: Stack, client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=BASE_MODEL, messages=MESSAGES)  # type: ignore[arg-type]

    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == BASE_MODEL
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == REPLY
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (PROMPT_TOKENS, 7)
    assert completion.usage.total_tokens == PROMPT_TOKENS + 7
    [sent] = gw.all_requests()
    assert sent.adapter == ""
    assert sent.request_id == completion.id
    assert [(m.role, m.content) for m in sent.chat.messages] == [(m["role"], m["content"]) for m in MESSAGES]


def test_adapter_is_pinned_to_its_latest_version(gw: Stack, client: openai.OpenAI) -> None:
    for model in (ADAPTER, f"{ADAPTER}@{ADAPTER_VERSION}"):
        completion = client.chat.completions.create(model=model, messages=MESSAGES)  # type: ignore[arg-type]
        assert completion.model == model
        assert completion.choices[0].message.content == f"Hello from {ADAPTER} choice0. Bye!"
    assert [r.adapter for r in gw.all_requests()] == [f"{ADAPTER}@{ADAPTER_VERSION}"] * 2


def test_sampling_fields_reach_the_upstream(gw: Stack, client: openai.OpenAI) -> None:
    client.chat.completions.create(
        model=BASE_MODEL,
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief"}]},
            {"role": "user", "content": "hi"},
        ],
        max_completion_tokens=50,
        max_tokens=10,
        temperature=0.0,
        top_p=0.9,
        seed=123,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        stop="!",
        user="someone",
        extra_body={"repetition_penalty": 1.1, "ignore_eos": True},  # unknown: accepted and logged; vLLM's extension
    )
    [sent] = gw.all_requests()
    params = sent.sampling
    assert params.max_tokens == 50  # max_completion_tokens wins over the deprecated max_tokens
    assert params.HasField("temperature") and params.temperature == 0.0
    assert abs(params.top_p - 0.9) < 1e-6
    assert params.seed == 123
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    assert list(params.stop) == ["!"]
    assert params.n == 1
    assert not params.HasField("logprobs")
    assert params.ignore_eos
    assert [(m.role, m.content) for m in sent.chat.messages] == [("system", "Be brief"), ("user", "hi")]


def test_unset_sampling_fields_stay_unset(gw: Stack, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=BASE_MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    params = gw.all_requests()[0].sampling
    assert not params.HasField("temperature") and not params.HasField("top_p") and not params.HasField("seed")
    assert params.max_tokens == 0
    assert not params.ignore_eos


def test_stream_role_then_deltas_then_finish(gw: Stack, client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=BASE_MODEL, messages=MESSAGES, stream=True))  # type: ignore[arg-type]

    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.finish_reason is None
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


def test_stream_include_usage_ends_with_usage_chunk(gw: Stack, client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=ADAPTER,
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        PROMPT_TOKENS,
        7,
        PROMPT_TOKENS + 7,
    )
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == f"Hello from {ADAPTER} choice0. Bye!"


def test_n2_non_stream_and_stream(gw: Stack, client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=BASE_MODEL, messages=MESSAGES, n=2)  # type: ignore[arg-type]
    assert [c.index for c in completion.choices] == [0, 1]
    assert [c.message.content for c in completion.choices] == [REPLY, "Hello from base choice1. Bye!"]
    assert completion.usage is not None and completion.usage.completion_tokens == 14

    chunks = list(client.chat.completions.create(model=BASE_MODEL, messages=MESSAGES, n=2, stream=True))  # type: ignore[arg-type]
    texts = {0: "", 1: ""}
    roles = set()
    finishes = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.delta.role:
                roles.add(choice.index)
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {0: REPLY, 1: "Hello from base choice1. Bye!"}
    assert roles == {0, 1}
    assert finishes == {0: "stop", 1: "stop"}
    assert gw.all_requests()[0].sampling.n == 2


def test_stop_and_length(gw: Stack, client: openai.OpenAI) -> None:
    stopped = client.chat.completions.create(model=BASE_MODEL, messages=MESSAGES, stop=[" Bye", "zzz"])  # type: ignore[arg-type]
    assert stopped.choices[0].message.content == "Hello from base choice0."
    assert stopped.choices[0].finish_reason == "stop"
    assert list(gw.all_requests()[0].sampling.stop) == [" Bye", "zzz"]

    cut = client.chat.completions.create(model=BASE_MODEL, messages=MESSAGES, max_tokens=3)  # type: ignore[arg-type]
    assert cut.choices[0].message.content == "Hello from base"
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage is not None and cut.usage.completion_tokens == 3


def test_logprobs(gw: Stack, client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=BASE_MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        logprobs=True,
        top_logprobs=2,
        max_tokens=2,
    )
    assert gw.all_requests()[0].sampling.logprobs == 2
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [t.token for t in logprobs.content] == ["Hello", " from"]
    assert logprobs.content[0].logprob == -0.25
    assert [t.token for t in logprobs.content[0].top_logprobs] == ["alt0", "alt1"]

    client.chat.completions.create(model=BASE_MODEL, messages=MESSAGES, logprobs=True)  # type: ignore[arg-type]
    assert gw.all_requests()[1].sampling.logprobs == 0  # the sampled token only


def test_unknown_fields_are_accepted_and_logged(
    gw: Stack, client: openai.OpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lorafleet_gateway.schemas")
    completion = client.chat.completions.create(
        model=BASE_MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        extra_body={"top_k": 5, "guided_json": {"type": "object"}},
    )
    assert completion.choices[0].message.content == REPLY
    assert any("top_k" in r.getMessage() and "guided_json" in r.getMessage() for r in caplog.records)
