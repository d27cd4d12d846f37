"""Rendering upstream chunks as OpenAI chat.completion and chat.completion.chunk objects."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from lorafleet.inference.v1 import inference_pb2
from lorafleet_gateway.chat.schemas import ChatCompletionRequest
from lorafleet_gateway.generation.aggregate import Choice, Usage, check_index, finish_reason
from lorafleet_gateway.generation.sse import chunk_frame, encode_json, encode_string, sse_event


def _token(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def chat_logprobs(items: Iterable[inference_pb2.TokenLogprob]) -> dict[str, Any]:
    content = [
        {**_token(item.token, item.logprob), "top_logprobs": [_token(t.token, t.logprob) for t in item.top]}
        for item in items
    ]
    return {"content": content, "refusal": None}


class ChatView:
    """One request's response, whole or chunked."""

    def __init__(self, completion_id: str, body: ChatCompletionRequest) -> None:
        self.id = completion_id
        self.created = int(time.time())
        self.body = body
        # Streaming: of each chunk event only the choice changes; the rest is encoded once, here.
        self._event_head, self._event_tail = chunk_frame(
            "chat.completion.chunk", completion_id, self.created, body.model, body.include_usage
        )

    def completion(self, choices: list[Choice], usage: Usage) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.body.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text, "refusal": None},
                    "logprobs": chat_logprobs(c.logprobs) if self.body.logprobs else None,
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ],
            "usage": usage.as_dict(),
        }

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.body.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.body.include_usage:
            chunk["usage"] = usage
        return chunk

    # Streaming: generation/sse.py's EventRenderer. Each event is byte for byte the encoding of _chunk([choice]).

    def opening(self) -> bytes:
        """The role chunk of each choice."""
        role = '"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}'
        return "".join(f'{self._event_head}{{"index":{i},{role}{self._event_tail}' for i in range(self.body.n)).encode()

    def render(self, chunk: inference_pb2.GenerateChunk) -> bytes:
        """A chunk per upstream delta (nothing for a chunk with no text, finish reason or logprobs)."""
        text, raw_finish = chunk.text, chunk.finish_reason
        if not (text or raw_finish or chunk.logprobs):
            return b""
        index = check_index(chunk, self.body.n)
        if self.body.logprobs:
            choice = encode_json(
                {
                    "index": index,
                    "delta": {"content": text} if text else {},
                    "logprobs": chat_logprobs(chunk.logprobs),
                    "finish_reason": finish_reason(raw_finish),
                }
            )
        else:
            delta = f'{{"content":{encode_string(text)}}}' if text else "{}"
            finish = finish_reason(raw_finish)
            finish_json = "null" if finish is None else encode_string(finish)
            choice = f'{{"index":{index},"delta":{delta},"logprobs":null,"finish_reason":{finish_json}}}'
        return f"{self._event_head}{choice}{self._event_tail}".encode()

    def closing(self, usage: Usage) -> bytes:
        """The usage chunk, if the request asked for it."""
        return sse_event(self._chunk([], usage=usage.as_dict())) if self.body.include_usage else b""
