"""Routes: GET /v1/models, GET /v1/models/{id}, DELETE /v1/models/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Request

from lorafleet_gateway.deps import CatalogDep, services
from lorafleet_gateway.models.schemas import ModelCard, ModelDeleted, ModelList
from lorafleet_gateway.quotas import CallerDep

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model_exclude_none=True)
async def list_models(catalog: CatalogDep, caller: CallerDep) -> ModelList:
    """List the base model and the caller's adapters."""
    return ModelList(data=await catalog.list_models(caller.tenant))


# Adapter ids contain ':' and '/' ("ft:base:tenant:suffix:job", "team/name@v1"): the path converter keeps them whole.
@router.get("/models/{model_id:path}", response_model_exclude_none=True)
async def retrieve_model(model_id: str, catalog: CatalogDep, caller: CallerDep) -> ModelCard:
    """Describe one model: the base model or one of the caller's adapters."""
    return await catalog.get(caller.tenant, model_id)


@router.delete("/models/{model_id:path}")
async def delete_model(model_id: str, request: Request, catalog: CatalogDep, caller: CallerDep) -> ModelDeleted:
    """Delete one of the caller's adapters (every version); the replicas are asked to unload it."""
    name = await catalog.delete(caller.tenant, model_id)
    await services(request).pool.unload_everywhere(name)
    return ModelDeleted(id=model_id)
