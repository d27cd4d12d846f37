"""Turning upstream chunks into whole choices (non-streaming responses) and OpenAI finish reasons."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from lorafleet.inference.v1 import inference_pb2
from lorafleet_gateway.errors import ServiceUnavailable, UpstreamFailed


def finish_reason(raw: str) -> str | None:
    """The OpenAI finish reason of an upstream chunk; None while the choice is still going.

    "abort" means the replica gave up (shutting down, engine error): that is a
    failure, not a reason to show a client.
    """
    if not raw:
        return None
    if raw == "abort":
        raise ServiceUnavailable("generation was aborted by the inference replica")
    return raw


@dataclass
class Choice:
    index: int
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[inference_pb2.TokenLogprob] = field(default_factory=list)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class UsageTracker:
    """Exact usage from the upstream's final chunk; counted tokens only if it never comes."""

    def __init__(self) -> None:
        self._reported: Usage | None = None
        self._counted = 0

    def add(self, chunk: inference_pb2.GenerateChunk) -> None:
        self._counted += chunk.token_count
        if chunk.HasField("usage"):
            self._reported = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)

    @property
    def usage(self) -> Usage:
        return self._reported or Usage(0, self._counted)

    @property
    def exact(self) -> Usage | None:
        """The upstream's own count, once its final chunk arrived."""
        return self._reported

    @property
    def counted(self) -> int:
        """Completion tokens seen so far (chunk by chunk)."""
        return self._counted


def check_index(chunk: inference_pb2.GenerateChunk, n: int) -> int:
    if chunk.index >= n:
        raise UpstreamFailed(f"inference replica returned choice {chunk.index} for a request of n={n}")
    return int(chunk.index)


async def collect(stream: AsyncIterator[inference_pb2.GenerateChunk], n: int) -> tuple[list[Choice], Usage]:
    """Read the whole stream into n choices plus usage."""
    choices = [Choice(i) for i in range(n)]
    usage = UsageTracker()
    async for chunk in stream:
        usage.add(chunk)
        if not (chunk.text or chunk.finish_reason or chunk.logprobs):
            continue
        choice = choices[check_index(chunk, n)]
        choice.text += chunk.text
        choice.logprobs.extend(chunk.logprobs)
        choice.finish_reason = finish_reason(chunk.finish_reason) or choice.finish_reason
    for choice in choices:
        # A replica that ends a stream without a finish reason stopped cleanly at its own limit.
        choice.finish_reason = choice.finish_reason or "stop"
    return choices, usage.usage
