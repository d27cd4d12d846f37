"""Routes: /v1/fine_tuning/jobs (create, list), /{id} (retrieve), /{id}/cancel, /{id}/events."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from lorafleet_gateway.auth import get_principal
from lorafleet_gateway.deps import FineTuningDep
from lorafleet_gateway.fine_tuning.schemas import FineTuningJobCreate

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine_tuning"], dependencies=[Depends(get_principal)])

Limit = Annotated[int, Query(ge=1, le=1000)]


def _list(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": has_more}


@router.post("/jobs")
async def create_job(body: FineTuningJobCreate, service: FineTuningDep) -> dict[str, Any]:
    """Create a LoRA fine-tuning job of the base model on an uploaded file."""
    return await service.create(body)


@router.get("/jobs")
async def list_jobs(service: FineTuningDep, after: str | None = None, limit: Limit = 20) -> dict[str, Any]:
    """List fine-tuning jobs, newest first."""
    return _list(*await service.list_jobs(after=after, limit=limit))


@router.get("/jobs/{job_id}")
async def retrieve_job(job_id: str, service: FineTuningDep) -> dict[str, Any]:
    """Describe one fine-tuning job."""
    return await service.get(job_id)


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, service: FineTuningDep) -> dict[str, Any]:
    """Cancel a queued or running job (no-op on finished ones)."""
    return await service.cancel(job_id)


@router.get("/jobs/{job_id}/events")
async def list_job_events(
    job_id: str, service: FineTuningDep, after: str | None = None, limit: Limit = 20
) -> dict[str, Any]:
    """List a job's events (state changes and training metrics), newest first."""
    return _list(*await service.events(job_id, after=after, limit=limit))
