"""What a GenerateRequest may ask for, and its translation into vLLM sampling parameters and back."""

from __future__ import annotations

import math
from typing import Any

from lorafleet.inference.v1 import inference_pb2 as pb
from lorafleet_inference.engine import make_sampling_params
from lorafleet_inference.errors import ContextLengthExceeded, InvalidRequest
from lorafleet_inference.prompts import CHAT_ROLES

MAX_STOP_STRINGS = 16


def check_request(request: pb.GenerateRequest, *, max_choices: int, max_logprobs: int) -> None:
    """Raise InvalidRequest listing every problem with the request's shape and sampling parameters."""
    problems = []
    kind = request.WhichOneof("input")
    if kind is None:
        problems.append("one of prompt or chat must be set")
    elif kind == "chat":
        if not request.chat.messages:
            problems.append("chat.messages must not be empty")
        for i, message in enumerate(request.chat.messages):
            if message.role not in CHAT_ROLES:
                problems.append(f"chat.messages[{i}].role must be one of {sorted(CHAT_ROLES)}, got {message.role!r}")
    s = request.sampling
    if s.n > max_choices:
        problems.append(f"sampling.n must be at most {max_choices}")
    if s.HasField("temperature") and not 0.0 <= s.temperature <= 2.0:
        problems.append("sampling.temperature must be in [0, 2]")
    if s.HasField("top_p") and not 0.0 < s.top_p <= 1.0:
        problems.append("sampling.top_p must be in (0, 1]")
    for field in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, field)
        if not math.isfinite(value) or not -2.0 <= value <= 2.0:
            problems.append(f"sampling.{field} must be in [-2, 2]")
    if s.HasField("logprobs") and s.logprobs > max_logprobs:
        problems.append(f"sampling.logprobs must be at most {max_logprobs}")
    if len(s.stop) > MAX_STOP_STRINGS or any(not stop for stop in s.stop):
        problems.append(f"sampling.stop takes at most {MAX_STOP_STRINGS} non-empty strings")
    if problems:
        raise InvalidRequest("; ".join(problems))


def sampling_params(s: pb.SamplingParams, *, prompt_tokens: int, max_model_len: int) -> Any:
    """vLLM SamplingParams (DELTA output) for the request; max_tokens 0 means "up to the context limit"."""
    room = max_model_len - prompt_tokens
    if s.max_tokens > room:
        raise ContextLengthExceeded(
            f"prompt ({prompt_tokens} tokens) plus max_tokens ({s.max_tokens}) exceeds this model's "
            f"context of {max_model_len} tokens; ask for at most {room} tokens"
        )
    try:
        return _make_sampling_params(s, room)
    except ValueError as exc:  # SamplingParams' own checks
        raise InvalidRequest(f"invalid sampling parameters: {exc}") from exc


def _make_sampling_params(s: pb.SamplingParams, room: int) -> Any:
    return make_sampling_params(
        n=s.n or 1,
        max_tokens=s.max_tokens or room,
        temperature=s.temperature if s.HasField("temperature") else 1.0,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        stop=list(s.stop) or None,
        seed=s.seed if s.HasField("seed") else None,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        logprobs=s.logprobs if s.HasField("logprobs") else None,
        ignore_eos=s.ignore_eos,
    )


def token_logprobs(completion: Any, top_k: int) -> list[pb.TokenLogprob]:
    """vLLM's per-token {token_id: Logprob} dicts as TokenLogprobs (the sampled token plus the top k)."""
    result = []
    for token_id, candidates in zip(completion.token_ids, completion.logprobs, strict=False):
        chosen = candidates.get(token_id)
        if chosen is None:
            continue
        best = sorted(candidates.values(), key=lambda c: c.rank)[:top_k]
        result.append(
            pb.TokenLogprob(
                token=chosen.decoded_token or "",
                logprob=chosen.logprob,
                top=[pb.TopLogprob(token=c.decoded_token or "", logprob=c.logprob) for c in best],
            )
        )
    return result
