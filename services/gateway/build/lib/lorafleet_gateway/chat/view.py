"""Rendering upstream chunks as OpenAI chat.completion and chat.completion.chunk objects."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from lorafleet.inference.v1 import inference_pb2
from lorafleet_gateway.chat.schemas import ChatCompletionRequest
from lorafleet_gateway.generation.aggregate import Choice, Usage, UsageTracker, check_index, finish_reason


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

    async def chunks(self, upstream: AsyncIterator[inference_pb2.GenerateChunk]) -> AsyncIterator[dict[str, Any]]:
        """The role chunk of each choice, a chunk per upstream delta, then usage if asked for."""
        n = self.body.n
        for index in range(n):
            role = {"role": "assistant", "content": ""}
            yield self._chunk([{"index": index, "delta": role, "logprobs": None, "finish_reason": None}])
        usage = UsageTracker()
        async for chunk in upstream:
            usage.add(chunk)
            if not (chunk.text or chunk.finish_reason or chunk.logprobs):
                continue
            choice = {
                "index": check_index(chunk, n),
                "delta": {"content": chunk.text} if chunk.text else {},
                "logprobs": chat_logprobs(chunk.logprobs) if self.body.logprobs else None,
                "finish_reason": finish_reason(chunk.finish_reason),
            }
            yield self._chunk([choice])
        if self.body.include_usage:
            yield self._chunk([], usage=usage.usage.as_dict())
