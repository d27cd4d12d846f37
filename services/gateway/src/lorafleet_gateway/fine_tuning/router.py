"""Routes: /v1/fine_tuning/jobs (create, list), /{id} (retrieve), /{id}/cancel, /{id}/events,
/{id}/events/stream (SSE, a LoRA Fleet extension), /{id}/checkpoints."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from lorafleet_gateway.deps import FineTuningDep
from lorafleet_gateway.fine_tuning.schemas import FineTuningJobCreate
from lorafleet_gateway.fine_tuning.stream import JobEventResponse
from lorafleet_gateway.quotas import CallerDep

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine_tuning"])

Limit = Annotated[int, Query(ge=1, le=1000)]


def _list(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


@router.post("/jobs")
async def create_job(body: FineTuningJobCreate, service: FineTuningDep, caller: CallerDep) -> dict[str, Any]:
    """Create a LoRA fine-tuning job of the base model on an uploaded file."""
    return await service.create(caller.tenant, body)


@router.get("/jobs")
async def list_jobs(
    service: FineTuningDep, caller: CallerDep, after: str | None = None, limit: Limit = 20
) -> dict[str, Any]:
    """List the caller's fine-tuning jobs, newest first."""
    return _list(*await service.list_jobs(caller.tenant, after=after, limit=limit))


@router.get("/jobs/{job_id}")
async def retrieve_job(job_id: str, service: FineTuningDep, caller: CallerDep) -> dict[str, Any]:
    """Describe one fine-tuning job."""
    return await service.get(caller.tenant, job_id)


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, service: FineTuningDep, caller: CallerDep) -> dict[str, Any]:
    """Cancel a queued or running job (no-op on finished ones)."""
    return await service.cancel(caller.tenant, job_id)


@router.get("/jobs/{job_id}/events")
async def list_job_events(
    job_id: str, service: FineTuningDep, caller: CallerDep, after: str | None = None, limit: Limit = 20
) -> dict[str, Any]:
    """List a job's events (state changes and training metrics), newest first."""
    return _list(*await service.events(caller.tenant, job_id, after=after, limit=limit))


@router.get(
    "/jobs/{job_id}/events/stream",
    response_class=StreamingResponse,
    responses={200: {"description": "Server-sent events: one job event each.", "content": {"text/event-stream": {}}}},
)
async def stream_job_events(
    job_id: str,
    request: Request,
    service: FineTuningDep,
    caller: CallerDep,
    after: str | None = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Stream a job's events as server-sent events, oldest first: the recorded ones, then live ones until the
    job is final (`data: [DONE]`). Resume with the `Last-Event-ID` header (or `?after=<event id>`)."""
    settings = request.app.state.settings
    stream = await service.watch(caller.tenant, job_id, after=last_event_id or after, timeout_s=settings.event_stream_s)
    return JobEventResponse(stream, keepalive_s=settings.event_keepalive_s)


@router.get("/jobs/{job_id}/checkpoints")
async def list_job_checkpoints(
    job_id: str, service: FineTuningDep, caller: CallerDep, after: str | None = None, limit: Limit = 10
) -> dict[str, Any]:
    """List a job's checkpoints, newest first (empty unless the trainer records checkpoint events)."""
    return _list(*await service.checkpoints(caller.tenant, job_id, after=after, limit=limit))
