"""GenerationService: admit, resolve the model, build the upstream request, start the stream, settle usage."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from lorafleet.inference.v1 import inference_pb2
from lorafleet_gateway.auth import Principal
from lorafleet_gateway.errors import InvalidRequest
from lorafleet_gateway.generation.aggregate import UsageTracker
from lorafleet_gateway.generation.schemas import GenerationRequest
from lorafleet_gateway.metrics import GatewayMetrics
from lorafleet_gateway.models.service import ModelCatalog, ResolvedModel
from lorafleet_gateway.quotas import RateLimiter, estimate_tokens
from lorafleet_gateway.upstream.inference import GenerationStream, InferencePool

# Told the tokens of each finished generation: (upstream adapter "name@version" or "" for the base model, tokens).
TokenObserver = Callable[[str, int], None]


def sampling_params(body: GenerationRequest, *, logprobs: int | None) -> inference_pb2.SamplingParams:
    """The proto's SamplingParams for an OpenAI request (unset optionals stay unset: engine defaults)."""
    params = inference_pb2.SamplingParams(
        max_tokens=body.token_limit() or 0,
        stop=body.stop or [],
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        n=body.n,
        ignore_eos=body.ignore_eos,
    )
    if body.temperature is not None:
        params.temperature = body.temperature
    if body.top_p is not None:
        params.top_p = body.top_p
    if body.seed is not None:
        params.seed = body.seed
    if logprobs is not None:
        params.logprobs = logprobs
    return params


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class GenerationService:
    """Owns the path from an OpenAI request to a started upstream stream (shared by chat and completions)."""

    def __init__(
        self,
        catalog: ModelCatalog,
        pool: InferencePool,
        metrics: GatewayMetrics,
        limiter: RateLimiter,
        *,
        max_prompt_chars: int,
        on_tokens: TokenObserver | None = None,
    ) -> None:
        self._catalog = catalog
        self._on_tokens = on_tokens
        self._pool = pool
        self._metrics = metrics
        self._limiter = limiter
        self._max_prompt_chars = max_prompt_chars

    def check_prompt(self, chars: int, param: str) -> None:
        """400 for prompts over the gateway's limit (the engine enforces the exact token limit itself)."""
        if chars > self._max_prompt_chars:
            raise InvalidRequest(
                f"The prompt is {chars} characters long; this server accepts at most {self._max_prompt_chars}.",
                param=param,
                code="context_length_exceeded",
            )

    async def resolve(self, principal: Principal, model: str) -> ResolvedModel:
        return await self._catalog.resolve(principal.tenant, model)

    async def start(
        self,
        principal: Principal,
        resolved: ResolvedModel,
        request: inference_pb2.GenerateRequest,
        *,
        prompt_chars: int,
    ) -> GenerationStream:
        """Admit against the key's TPM, send ``request`` and wait for the first chunk (errors before it raise).

        The prompt's estimate is charged now; when the stream ends, the exact
        usage replaces it. A request that fails before its first chunk is refunded.
        """
        estimate = estimate_tokens(prompt_chars)
        self._limiter.admit_tokens(principal, estimate)

        def settle(usage: UsageTracker) -> None:
            exact = usage.exact
            spent = exact.prompt_tokens - estimate + exact.completion_tokens if exact else usage.counted
            self._limiter.charge_tokens(principal, spent)
            prompt, completion = (exact.prompt_tokens, exact.completion_tokens) if exact else (estimate, usage.counted)
            self._metrics.count_tokens(principal.tenant, resolved.name, prompt=prompt, completion=completion)
            if self._on_tokens is not None:
                self._on_tokens(resolved.adapter, prompt + completion)

        request.adapter = resolved.adapter
        started = time.perf_counter()
        try:
            stream = await self._pool.generate(request, on_finish=settle)
        except BaseException:  # failed or cancelled before the first token: nothing was generated
            self._limiter.charge_tokens(principal, -estimate)
            raise
        self._metrics.observe_first_token(resolved.kind, time.perf_counter() - started)
        return stream
