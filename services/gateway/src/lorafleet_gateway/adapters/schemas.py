"""Adapter details and placement results (LoRA Fleet extension objects)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from lorafleet_gateway.schemas import InternalModel
from lorafleet_gateway.tenancy.keys import DEFAULT_TENANT


class AdapterVersion(BaseModel):
    version: str
    created_at: int
    job_id: str | None = None
    final_loss: float | None = None
    latest: bool = False


class Placement(BaseModel):
    """One replica holding some versions of the adapter. Tenants see an opaque replica id, the admin its address."""

    replica: str
    versions: list[str]
    merged_version: str | None = Field(
        default=None,
        description="The version merged into this replica's base weights (it then serves that version only, "
        "without LoRA); null in LoRA mode.",
    )


class AdapterTraffic(BaseModel):
    """What this gateway process served with the adapter since it started (all versions)."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class AdapterDetail(BaseModel):
    """An adapter as a dashboard needs it: the latest version's metadata, every version, placement, traffic."""

    id: str
    object: Literal["lorafleet.adapter"] = "lorafleet.adapter"
    owned_by: str
    base_model: str
    latest_version: str
    created_at: int
    rank: int
    alpha: float
    target_modules: list[str]
    system_prompt: str | None = None
    job_id: str | None = None
    final_loss: float | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    sha256: str
    versions: list[AdapterVersion]
    loaded_on: list[Placement] = Field(default_factory=list)
    traffic: AdapterTraffic = Field(default_factory=AdapterTraffic)


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterDetail]


class UnloadRequest(InternalModel):
    tenant: str = Field(default=DEFAULT_TENANT, description="Whose model id this is (default: the admin's own).")


class LoadRequest(UnloadRequest):
    pin: bool = Field(default=False, description="Keep it loaded regardless of eviction pressure.")


class ReplicaResult(BaseModel):
    replica: str
    ok: bool
    loaded: bool | None = None
    version: str | None = None
    error: str | None = None


class PlacementResult(BaseModel):
    id: str
    object: Literal["lorafleet.adapter.placement"] = "lorafleet.adapter.placement"
    tenant: str
    action: Literal["load", "unload"]
    adapter: str  # what the replicas were asked: "<store name>@<version>", or "<store name>" for every version
    replicas: list[ReplicaResult]
