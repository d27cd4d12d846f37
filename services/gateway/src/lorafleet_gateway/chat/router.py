"""Route: POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from lorafleet.inference.v1 import inference_pb2
from lorafleet_gateway.chat.schemas import ChatCompletionRequest
from lorafleet_gateway.chat.view import ChatView
from lorafleet_gateway.deps import GenerationDep
from lorafleet_gateway.generation.aggregate import collect
from lorafleet_gateway.generation.service import new_request_id, sampling_params
from lorafleet_gateway.generation.sse import SSEResponse, unless_disconnected
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


@router.post("/chat/completions", response_model=None, responses=GENERATION_RESPONSES)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, service: GenerationDep, caller: CallerDep
) -> Response:
    """Create a chat completion with the base model or one of the caller's adapters; SSE when `stream` is true."""
    prompt_chars = body.prompt_chars()
    service.check_prompt(prompt_chars, "messages")
    resolved = await service.resolve(caller, body.model)
    request.state.model_kind, request.state.model_label = resolved.kind, resolved.name
    view = ChatView(new_request_id("chatcmpl"), body)
    upstream = await service.start(caller, resolved, generate_request(body, view.id), prompt_chars=prompt_chars)
    if body.stream:
        return SSEResponse(view, upstream)
    choices, usage = await unless_disconnected(request, collect(upstream, body.n), upstream)
    return JSONResponse(view.completion(choices, usage))
