"""Routes: GET /v1/models, GET /v1/models/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from lorafleet_gateway.auth import get_principal
from lorafleet_gateway.deps import CatalogDep
from lorafleet_gateway.models.schemas import ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(get_principal)])


@router.get("/models", response_model_exclude_none=True)
async def list_models(catalog: CatalogDep) -> ModelList:
    """List the base model and every published adapter."""
    return ModelList(data=await catalog.list_models())


# Adapter ids contain ':' and '/' ("ft:base:suffix:job", "tenant/name@v1"): the path converter keeps them whole.
@router.get("/models/{model_id:path}", response_model_exclude_none=True)
async def retrieve_model(model_id: str, catalog: CatalogDep) -> ModelCard:
    """Describe one model: the base model or a published adapter."""
    return await catalog.get(model_id)
