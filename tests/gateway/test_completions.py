"""POST /v1/completions through the official openai client."""

from __future__ import annotations

import openai

from tests.gateway.gateway_harness import ADAPTER, ADAPTER_VERSION, BASE_MODEL, Stack

PROMPT = "Once upon a time"
REPLY = "Hello from base choice0. Bye!"


def test_non_stream_exact_usage(gw: Stack, client: openai.OpenAI) -> None:
    completion = client.completions.create(model=BASE_MODEL, prompt=PROMPT)
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    assert completion.choices[0].text == REPLY
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 7)
    [sent] = gw.all_requests()
    assert sent.WhichOneof("input") == "prompt" and sent.prompt == PROMPT


def test_single_element_prompt_list_and_adapter(gw: Stack, client: openai.OpenAI) -> None:
    completion = client.completions.create(model=ADAPTER, prompt=[PROMPT])
    assert completion.choices[0].text == f"Hello from {ADAPTER} choice0. Bye!"
    assert gw.all_requests()[0].adapter == f"{ADAPTER}@{ADAPTER_VERSION}"


def test_stream_with_usage_n2_and_stop(gw: Stack, client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=BASE_MODEL,
            prompt=PROMPT,
            n=2,
            stop=" Bye",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in chunks[:-1]:
        assert chunk.usage is None
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {0: "Hello from base choice0.", 1: "Hello from base choice1."}
    assert finishes == {0: "stop", 1: "stop"}
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    # Each choice: 5 tokens, then the stop string's token (generated, counted, not returned).
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (4, 12, 16)


def test_max_tokens_and_logprobs(gw: Stack, client: openai.OpenAI) -> None:
    completion = client.completions.create(model=BASE_MODEL, prompt=PROMPT, max_tokens=2, logprobs=1)
    choice = completion.choices[0]
    assert choice.text == "Hello from" and choice.finish_reason == "length"
    assert choice.logprobs is not None
    assert choice.logprobs.tokens == ["Hello", " from"]
    assert choice.logprobs.token_logprobs == [-0.25, -0.25]
    assert choice.logprobs.top_logprobs == [{"alt0": -1.0}, {"alt0": -1.0}]
    assert choice.logprobs.text_offset == [0, 5]
    assert gw.all_requests()[0].sampling.logprobs == 1
