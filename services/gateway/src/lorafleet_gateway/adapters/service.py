"""AdapterService: a tenant's adapters with their versions, metadata, placement on replicas and traffic;
and the admin's explicit load/unload on the replicas.

Everything is looked up through the tenant's namespace (ModelCatalog), so a
tenant sees, and the admin places, exactly what /v1/models would resolve.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from typing import Literal

from lorafleet_common.adapters import (
    ADAPTERS_PREFIX,
    METADATA_FILE,
    AdapterMetadata,
    AdapterNotFound,
    read_metadata,
    resolve_version,
)
from lorafleet_common.names import InvalidName, parse_adapter_ref
from lorafleet_common.store import ObjectStore, StoreError
from lorafleet_gateway.adapters.schemas import (
    AdapterDetail,
    AdapterTraffic,
    AdapterVersion,
    Placement,
    PlacementResult,
    ReplicaResult,
)
from lorafleet_gateway.auth import Principal
from lorafleet_gateway.errors import InvalidRequest, ModelNotFound, ServiceUnavailable
from lorafleet_gateway.metrics import GatewayMetrics
from lorafleet_gateway.models.service import ModelCatalog
from lorafleet_gateway.upstream.inference import InferencePool
from lorafleet_gateway.upstream.placement import (
    ReplicaOutcome,
    load_everywhere,
    loaded_versions,
    merged_versions,
    unload_everywhere,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlacementTimeouts:
    load_s: float  # fetch + verify + load into the engine
    unload_s: float


def replica_label(target: str, *, admin: bool) -> str:
    """The admin sees replica addresses; tenants a stable opaque id (the fleet's topology is not theirs to know)."""
    return target if admin else f"replica-{hashlib.sha256(target.encode()).hexdigest()[:8]}"


def _versions(store: ObjectStore, name: str, latest: str) -> list[AdapterVersion]:
    """Every published version (those with metadata.json), newest first; a version that cannot be read is skipped."""
    prefix = f"{ADAPTERS_PREFIX}/{name}/versions/"
    found = []
    for key in store.list(prefix):
        parts = key[len(prefix) :].split("/")
        if len(parts) != 2 or parts[1] != METADATA_FILE:  # another file, or a nested adapter's
            continue
        try:
            meta = read_metadata(store, name, parts[0])
        except (AdapterNotFound, InvalidName, ValueError) as exc:
            logger.warning("skipping version %s of adapter %r: %s", parts[0], name, exc)
            continue
        found.append(
            AdapterVersion(
                version=meta.version,
                created_at=int(meta.created_at),
                job_id=meta.job_id,
                final_loss=meta.final_loss,
                latest=meta.version == latest,
            )
        )
    return sorted(found, key=lambda v: (v.created_at, v.version), reverse=True)


def _describe(store: ObjectStore, visible: str, name: str, tenant: str) -> AdapterDetail:
    """The store side of an adapter's details (metadata and versions): sync, run it in a thread."""
    latest = resolve_version(store, parse_adapter_ref(name))
    meta: AdapterMetadata = read_metadata(store, name, latest)
    return AdapterDetail(
        id=visible,
        owned_by=tenant,
        base_model=meta.base_model,
        latest_version=latest,
        created_at=int(meta.created_at),
        rank=meta.rank,
        alpha=meta.alpha,
        target_modules=meta.target_modules,
        system_prompt=meta.system_prompt,
        job_id=meta.job_id,
        final_loss=meta.final_loss,
        hyperparameters=meta.hyperparameters,
        sha256=meta.sha256,
        versions=_versions(store, name, latest),
    )


def _describe_all(store: ObjectStore, catalog: ModelCatalog, tenant: str) -> list[tuple[str, AdapterDetail]]:
    described = []
    for visible, name in sorted(catalog.adapter_names(tenant).items()):
        try:
            described.append((name, _describe(store, visible, name, tenant)))
        except (AdapterNotFound, InvalidName, ValueError) as exc:
            # A half-deleted or hand-edited adapter must not break the listing (as in /v1/models).
            logger.warning("skipping adapter %r in /v1/lorafleet/adapters: %s", name, exc)
    return described


class AdapterService:
    """Owns /v1/lorafleet/adapters and /v1/admin/adapters."""

    def __init__(
        self,
        store: ObjectStore,
        catalog: ModelCatalog,
        pool: InferencePool,
        metrics: GatewayMetrics,
        timeouts: PlacementTimeouts,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._pool = pool
        self._metrics = metrics
        self._timeouts = timeouts

    def _live(self, detail: AdapterDetail, name: str, principal: Principal, traffic: AdapterTraffic) -> AdapterDetail:
        """Add what only this process knows: where the replicas have it loaded, and its traffic here."""
        merged = merged_versions(self._pool, name)
        detail.loaded_on = [
            Placement(
                replica=replica_label(target, admin=principal.is_admin),
                versions=versions,
                merged_version=merged.get(target),
            )
            for target, versions in sorted(loaded_versions(self._pool, name).items())
        ]
        detail.traffic = traffic
        return detail

    def _traffic(self) -> dict[str, AdapterTraffic]:
        return {model: AdapterTraffic(**vars(t)) for model, t in self._metrics.traffic().items()}

    async def list_adapters(self, principal: Principal) -> list[AdapterDetail]:
        try:
            described = await asyncio.to_thread(_describe_all, self._store, self._catalog, principal.tenant)
        except StoreError as exc:
            raise ServiceUnavailable(f"object store unavailable while listing adapters: {exc}") from exc
        traffic = self._traffic()
        return [self._live(d, name, principal, traffic.get(name, AdapterTraffic())) for name, d in described]

    async def get(self, principal: Principal, model: str) -> AdapterDetail:
        resolved = await self._catalog.resolve(principal.tenant, model)
        if resolved.kind == "base":
            raise ModelNotFound(f"'{model}' is the base model, not an adapter", param="model")
        visible = model.partition("@")[0]
        try:
            detail = await asyncio.to_thread(_describe, self._store, visible, resolved.name, principal.tenant)
        except (AdapterNotFound, InvalidName, ValueError) as exc:  # deleted between resolve and read
            raise ModelNotFound(f"The model '{model}' does not exist", param="model") from exc
        except StoreError as exc:
            raise ServiceUnavailable(f"object store unavailable while reading {model!r}: {exc}") from exc
        return self._live(detail, resolved.name, principal, self._traffic().get(resolved.name, AdapterTraffic()))

    async def load(self, tenant: str, model: str, *, pin: bool) -> PlacementResult:
        """Load the tenant's adapter (its LATEST version, or the one named) on every replica."""
        resolved = await self._adapter(tenant, model)
        outcomes = await load_everywhere(self._pool, resolved, pin=pin, timeout_s=self._timeouts.load_s)
        logger.info("admin loaded %s on %d replica(s)", resolved, sum(o.error is None for o in outcomes))
        return _result(model, tenant, "load", resolved, outcomes)

    async def unload(self, tenant: str, model: str) -> PlacementResult:
        """Unload the tenant's adapter from every replica: every version, or only the one named."""
        resolved = await self._adapter(tenant, model)
        adapter = resolved if "@" in model else resolved.partition("@")[0]
        outcomes = await unload_everywhere(self._pool, adapter, timeout_s=self._timeouts.unload_s)
        logger.info("admin unloaded %s from %d replica(s)", adapter, sum(o.error is None for o in outcomes))
        return _result(model, tenant, "unload", adapter, outcomes)

    async def _adapter(self, tenant: str, model: str) -> str:
        resolved = await self._catalog.resolve(tenant, model)
        if resolved.kind == "base":
            raise InvalidRequest("The base model is always loaded; name an adapter.", param="model")
        if not self._pool.replicas:
            raise ServiceUnavailable("no inference replica is known to this gateway")
        return resolved.adapter


def _result(
    model: str, tenant: str, action: Literal["load", "unload"], adapter: str, outcomes: list[ReplicaOutcome]
) -> PlacementResult:
    """The per-replica report; if no replica did it, the first replica's error is the answer."""
    if all(o.error is not None for o in outcomes):
        error = next(o.error for o in outcomes if o.error is not None)
        raise error
    replicas = [
        ReplicaResult(
            replica=o.replica,
            ok=o.error is None,
            loaded=o.loaded,
            version=o.version,
            error=o.error.message if o.error is not None else None,
        )
        for o in outcomes
    ]
    return PlacementResult(id=model, tenant=tenant, action=action, adapter=adapter, replicas=replicas)
