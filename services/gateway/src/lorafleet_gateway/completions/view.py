"""Rendering upstream chunks as OpenAI text_completion objects."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from lorafleet.inference.v1 import inference_pb2
from lorafleet_gateway.completions.schemas import CompletionRequest
from lorafleet_gateway.generation.aggregate import Choice, Usage, check_index, finish_reason
from lorafleet_gateway.generation.sse import chunk_frame, encode_json, encode_string, sse_event


def completion_logprobs(items: Iterable[inference_pb2.TokenLogprob], start_offset: int = 0) -> dict[str, Any]:
    """The legacy logprobs object; text_offset counts characters from the start of the completion."""
    tokens = list(items)
    offsets = []
    offset = start_offset
    for item in tokens:
        offsets.append(offset)
        offset += len(item.token)
    return {
        "tokens": [item.token for item in tokens],
        "token_logprobs": [item.logprob for item in tokens],
        "top_logprobs": [{t.token: t.logprob for t in item.top} for item in tokens],
        "text_offset": offsets,
    }


class CompletionView:
    """One request's response, whole or chunked."""

    def __init__(self, completion_id: str, body: CompletionRequest) -> None:
        self.id = completion_id
        self.created = int(time.time())
        self.body = body
        # Streaming: of each chunk event only the choice changes; the rest is encoded once, here.
        self._event_head, self._event_tail = chunk_frame(
            "text_completion", completion_id, self.created, body.model, body.include_usage
        )
        self._offsets = [0] * body.n  # per choice: characters streamed so far, for logprobs' text_offset

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.body.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def completion(self, choices: list[Choice], usage: Usage) -> dict[str, Any]:
        rendered = [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": completion_logprobs(c.logprobs) if self.body.logprobs is not None else None,
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ]
        return {**self._envelope(rendered), "usage": usage.as_dict()}

    # Streaming: generation/sse.py's EventRenderer. Each event is byte for byte the encoding of
    # _envelope([choice]), plus "usage": null when usage was asked for.

    def opening(self) -> bytes:
        return b""

    def render(self, chunk: inference_pb2.GenerateChunk) -> bytes:
        """A chunk per upstream delta (nothing for a chunk with no text, finish reason or logprobs)."""
        text, raw_finish = chunk.text, chunk.finish_reason
        if not (text or raw_finish or chunk.logprobs):
            return b""
        index = check_index(chunk, self.body.n)
        if self.body.logprobs is not None:
            logprobs = completion_logprobs(chunk.logprobs, self._offsets[index])
            self._offsets[index] += len(text)
            choice = encode_json(
                {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(raw_finish)}
            )
        else:
            finish = finish_reason(raw_finish)
            finish_json = "null" if finish is None else encode_string(finish)
            choice = f'{{"index":{index},"text":{encode_string(text)},"logprobs":null,"finish_reason":{finish_json}}}'
        return f"{self._event_head}{choice}{self._event_tail}".encode()

    def closing(self, usage: Usage) -> bytes:
        """The usage chunk, if the request asked for it."""
        return sse_event({**self._envelope([]), "usage": usage.as_dict()}) if self.body.include_usage else b""
