"""Route: POST /v1/completions (declared here for FastAPI; generation/fast_path.py serves its valid requests)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.types import Receive

from lorafleet.inference.v1 import inference_pb2
from lorafleet_gateway.auth import Principal
from lorafleet_gateway.completions.schemas import CompletionRequest
from lorafleet_gateway.completions.view import CompletionView
from lorafleet_gateway.deps import GenerationDep
from lorafleet_gateway.generation.fast_path import GenerationRoute
from lorafleet_gateway.generation.reply import reply
from lorafleet_gateway.generation.service import GenerationService, new_request_id, sampling_params
from lorafleet_gateway.openapi import GENERATION_RESPONSES
from lorafleet_gateway.quotas import CallerDep

router = APIRouter(prefix="/v1", tags=["completions"])


def generate_request(body: CompletionRequest, request_id: str) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        request_id=request_id, prompt=body.prompt, sampling=sampling_params(body, logprobs=body.logprobs)
    )


async def respond(
    body: CompletionRequest, service: GenerationService, caller: Principal, state: dict[str, Any], receive: Receive
) -> Response:
    """The response to a valid request of an admitted caller (both paths end here)."""
    service.check_prompt(len(body.prompt), "prompt")
    resolved = await service.resolve(caller, body.model)
    state["model_kind"], state["model_label"] = resolved.kind, resolved.name
    view = CompletionView(new_request_id("cmpl"), body)
    upstream = await service.start(caller, resolved, generate_request(body, view.id), prompt_chars=len(body.prompt))
    return await reply(view, upstream, stream=body.stream, n=body.n, receive=receive)


COMPLETIONS_ROUTE = GenerationRoute("/v1/completions", CompletionRequest, respond)


@router.post("/completions", response_model=None, responses=GENERATION_RESPONSES)
async def create_completion(
    body: CompletionRequest, request: Request, service: GenerationDep, caller: CallerDep
) -> Response:
    """Complete a raw prompt with the base model or one of the caller's adapters; SSE when `stream` is true."""
    return await respond(body, service, caller, request.scope.setdefault("state", {}), request.receive)
