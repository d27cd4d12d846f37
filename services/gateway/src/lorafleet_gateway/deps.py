"""What the app is built from (GatewayDeps), what its lifespan builds (GatewayServices), and the
FastAPI dependencies that hand routers their service."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry

from lorafleet_common.store import ObjectStore
from lorafleet_gateway.adapters.service import AdapterService
from lorafleet_gateway.files.service import FileService
from lorafleet_gateway.fine_tuning.service import FineTuningService
from lorafleet_gateway.generation.service import GenerationService
from lorafleet_gateway.metrics import GatewayMetrics
from lorafleet_gateway.models.service import ModelCatalog
from lorafleet_gateway.settings import GatewaySettings
from lorafleet_gateway.tenancy.directory import TenantDirectory
from lorafleet_gateway.upstream.hot_adapters import HotAdapterPlanner
from lorafleet_gateway.upstream.inference import InferencePool
from lorafleet_gateway.upstream.trainer import TrainerClient


@dataclass
class GatewayDeps:
    """Outside resources create_app uses; tests pass their own store and registry."""

    store: ObjectStore
    registry: CollectorRegistry

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> GatewayDeps:
        return cls(store=settings.open_store(), registry=CollectorRegistry())


@dataclass
class GatewayServices:
    """Everything the routers use, built once per app in its lifespan."""

    pool: InferencePool
    trainer: TrainerClient
    catalog: ModelCatalog
    generation: GenerationService
    files: FileService
    fine_tuning: FineTuningService
    metrics: GatewayMetrics
    directory: TenantDirectory
    adapters: AdapterService
    hot_adapters: HotAdapterPlanner | None = None  # only with LORAFLEET_GATEWAY_MERGE_ENABLED


# The dependencies below are async on purpose: FastAPI runs plain `def` dependencies in a worker thread,
# which costs more than everything else these do.


def services(request: Request) -> GatewayServices:
    built: GatewayServices = request.app.state.services
    return built


async def _catalog(request: Request) -> ModelCatalog:
    return services(request).catalog


async def _generation(request: Request) -> GenerationService:
    return services(request).generation


async def _files(request: Request) -> FileService:
    return services(request).files


async def _fine_tuning(request: Request) -> FineTuningService:
    return services(request).fine_tuning


CatalogDep = Annotated[ModelCatalog, Depends(_catalog)]
GenerationDep = Annotated[GenerationService, Depends(_generation)]
FilesDep = Annotated[FileService, Depends(_files)]
FineTuningDep = Annotated[FineTuningService, Depends(_fine_tuning)]
