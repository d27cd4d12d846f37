"""GenerationService: resolve the model, build the upstream request, start the stream."""

from __future__ import annotations

import time
import uuid

from lorafleet.inference.v1 import inference_pb2
from lorafleet_gateway.generation.schemas import GenerationRequest
from lorafleet_gateway.metrics import GatewayMetrics
from lorafleet_gateway.models.service import ModelCatalog, ResolvedModel
from lorafleet_gateway.upstream.inference import GenerationStream, InferencePool


def sampling_params(body: GenerationRequest, *, logprobs: int | None) -> inference_pb2.SamplingParams:
    """The proto's SamplingParams for an OpenAI request (unset optionals stay unset: engine defaults)."""
    params = inference_pb2.SamplingParams(
        max_tokens=body.token_limit() or 0,
        stop=body.stop or [],
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        n=body.n,
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

    def __init__(self, catalog: ModelCatalog, pool: InferencePool, metrics: GatewayMetrics) -> None:
        self._catalog = catalog
        self._pool = pool
        self._metrics = metrics

    async def resolve(self, model: str) -> ResolvedModel:
        return await self._catalog.resolve(model)

    async def start(self, resolved: ResolvedModel, request: inference_pb2.GenerateRequest) -> GenerationStream:
        """Send ``request`` for ``resolved`` and wait for the first chunk (errors before it raise)."""
        request.adapter = resolved.adapter
        started = time.perf_counter()
        stream = await self._pool.generate(request)
        self._metrics.time_to_first_token.labels(model_kind=resolved.kind).observe(time.perf_counter() - started)
        return stream
