"""Route: POST /v1/chat/completions (declared here for FastAPI; generation/fast_path.py serves its valid requests)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.types import Receive

from lorafleet.inference.v1 import inference_pb2
from lorafleet_gateway.auth import Principal
from lorafleet_gateway.chat.schemas import ChatCompletionRequest
from lorafleet_gateway.chat.view import ChatView
from lorafleet_gateway.deps import GenerationDep
from lorafleet_gateway.generation.fast_path import GenerationRoute
from lorafleet_gateway.generation.reply import reply
from lorafleet_gateway.generation.service import GenerationService, new_request_id, sampling_params
from lorafleet_gateway.openapi import GENERATION_RESPONSES
from lorafleet_gateway.quotas import CallerDep

router = APIRouter(prefix="/v1", tags=["chat"])


def generate_request(body: ChatCompletionRequest, request_id: str) -> inference_pb2.GenerateRequest:
    messages = [inference_pb2.ChatMessage(role=m.upstream_role, content=m.content or "") for m in body.messages]
    return inference_pb2.GenerateRequest(
        request_id=request_id,
        chat=inference_pb2.ChatInput(messages=messages),
        sampling=sampling_params(body, logprobs=body.upstream_logprobs()),
    )


async def respond(
    body: ChatCompletionRequest, service: GenerationService, caller: Principal, state: dict[str, Any], receive: Receive
) -> Response:
    """The response to a valid request of an admitted caller (both paths end here)."""
    prompt_chars = body.prompt_chars()
    service.check_prompt(prompt_chars, "messages")
    resolved = await service.resolve(caller, body.model)
    state["model_kind"], state["model_label"] = resolved.kind, resolved.name
    view = ChatView(new_request_id("chatcmpl"), body)
    upstream = await service.start(caller, resolved, generate_request(body, view.id), prompt_chars=prompt_chars)
    return await reply(view, upstream, stream=body.stream, n=body.n, receive=receive)


CHAT_ROUTE = GenerationRoute("/v1/chat/completions", ChatCompletionRequest, respond)


@router.post("/chat/completions", response_model=None, responses=GENERATION_RESPONSES)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, service: GenerationDep, caller: CallerDep
) -> Response:
    """Create a chat completion with the base model or one of the caller's adapters; SSE when `stream` is true."""
    return await respond(body, service, caller, request.scope.setdefault("state", {}), request.receive)
