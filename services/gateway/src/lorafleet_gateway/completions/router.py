"""Route: POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from lorafleet.inference.v1 import inference_pb2
from lorafleet_gateway.completions.schemas import CompletionRequest
from lorafleet_gateway.completions.view import CompletionView
from lorafleet_gateway.deps import GenerationDep
from lorafleet_gateway.generation.aggregate import collect
from lorafleet_gateway.generation.service import new_request_id, sampling_params
from lorafleet_gateway.generation.sse import SSEResponse, unless_disconnected
from lorafleet_gateway.openapi import GENERATION_RESPONSES
from lorafleet_gateway.quotas import CallerDep

router = APIRouter(prefix="/v1", tags=["completions"])


def generate_request(body: CompletionRequest, request_id: str) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        request_id=request_id, prompt=body.prompt, sampling=sampling_params(body, logprobs=body.logprobs)
    )


@router.post("/completions", response_model=None, responses=GENERATION_RESPONSES)
async def create_completion(
    body: CompletionRequest, request: Request, service: GenerationDep, caller: CallerDep
) -> Response:
    """Complete a raw prompt with the base model or one of the caller's adapters; SSE when `stream` is true."""
    service.check_prompt(len(body.prompt), "prompt")
    resolved = await service.resolve(caller, body.model)
    request.state.model_kind, request.state.model_label = resolved.kind, resolved.name
    view = CompletionView(new_request_id("cmpl"), body)
    upstream = await service.start(caller, resolved, generate_request(body, view.id), prompt_chars=len(body.prompt))
    if body.stream:
        return SSEResponse(view, upstream)
    choices, usage = await unless_disconnected(request, collect(upstream, body.n), upstream)
    return JSONResponse(view.completion(choices, usage))
