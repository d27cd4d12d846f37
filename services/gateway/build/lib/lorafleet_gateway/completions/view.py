"""Rendering upstream chunks as OpenAI text_completion objects."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from lorafleet.inference.v1 import inference_pb2
from lorafleet_gateway.completions.schemas import CompletionRequest
from lorafleet_gateway.generation.aggregate import Choice, Usage, UsageTracker, check_index, finish_reason


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

    async def chunks(self, upstream: AsyncIterator[inference_pb2.GenerateChunk]) -> AsyncIterator[dict[str, Any]]:
        """A chunk per upstream delta, then usage if asked for."""
        include_usage = self.body.include_usage
        offsets = [0] * self.body.n
        usage = UsageTracker()
        async for chunk in upstream:
            usage.add(chunk)
            if not (chunk.text or chunk.finish_reason or chunk.logprobs):
                continue
            index = check_index(chunk, self.body.n)
            logprobs = None
            if self.body.logprobs is not None:
                logprobs = completion_logprobs(chunk.logprobs, offsets[index])
            offsets[index] += len(chunk.text)
            choice = {
                "index": index,
                "text": chunk.text,
                "logprobs": logprobs,
                "finish_reason": finish_reason(chunk.finish_reason),
            }
            event = self._envelope([choice])
            if include_usage:
                event["usage"] = None
            yield event
        if include_usage:
            yield {**self._envelope([]), "usage": usage.usage.as_dict()}
