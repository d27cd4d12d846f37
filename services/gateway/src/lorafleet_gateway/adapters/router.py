"""Routes: GET /v1/lorafleet/adapters, GET /v1/lorafleet/adapters/{id} (any key, its tenant's adapters);
POST /v1/admin/adapters/{id}/load and /unload (admin key only: placement affects every tenant's replicas)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Request

from lorafleet_gateway.adapters.schemas import AdapterDetail, AdapterList, LoadRequest, PlacementResult, UnloadRequest
from lorafleet_gateway.adapters.service import AdapterService
from lorafleet_gateway.auth import require_admin
from lorafleet_gateway.quotas import CallerDep

router = APIRouter(prefix="/v1/lorafleet", tags=["lorafleet"])
admin_router = APIRouter(prefix="/v1/admin/adapters", tags=["admin"], dependencies=[Depends(require_admin)])


async def _adapters(request: Request) -> AdapterService:
    service: AdapterService = request.app.state.services.adapters
    return service


AdaptersDep = Annotated[AdapterService, Depends(_adapters)]


@router.get("/adapters")
async def list_adapters(service: AdaptersDep, caller: CallerDep) -> AdapterList:
    """The caller's adapters with versions, metadata, where they are loaded and their traffic on this gateway."""
    return AdapterList(data=await service.list_adapters(caller))


# Adapter ids contain ':' and '/': the path converter keeps them whole.
@router.get("/adapters/{model_id:path}")
async def retrieve_adapter(model_id: str, service: AdaptersDep, caller: CallerDep) -> AdapterDetail:
    """One of the caller's adapters, in detail."""
    return await service.get(caller, model_id)


@admin_router.post("/{model_id:path}/load")
async def load_adapter(
    model_id: str, service: AdaptersDep, body: Annotated[LoadRequest | None, Body()] = None
) -> PlacementResult:
    """Load a tenant's adapter (LATEST, or `id@version`) on every inference replica; optionally pin it."""
    body = body or LoadRequest()
    return await service.load(body.tenant, model_id, pin=body.pin)


@admin_router.post("/{model_id:path}/unload")
async def unload_adapter(
    model_id: str, service: AdaptersDep, body: Annotated[UnloadRequest | None, Body()] = None
) -> PlacementResult:
    """Unload a tenant's adapter (every version, or `id@version`) from every inference replica."""
    body = body or UnloadRequest()
    return await service.unload(body.tenant, model_id)
