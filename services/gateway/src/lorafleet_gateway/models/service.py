"""The model catalog of one tenant: the base model plus the tenant's adapters in the store."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from lorafleet_common.adapters import (
    ADAPTERS_PREFIX,
    AdapterMetadata,
    AdapterNotFound,
    latest_key,
    list_adapter_names,
    read_metadata,
    resolve_version,
)
from lorafleet_common.names import AdapterRef, InvalidName, parse_adapter_ref, validate_adapter_name
from lorafleet_common.store import ObjectStore, StoreError
from lorafleet_gateway.errors import InvalidRequest, ModelNotFound, PermissionDenied, ServiceUnavailable
from lorafleet_gateway.models.schemas import ModelCard
from lorafleet_gateway.tenancy.keys import DEFAULT_TENANT
from lorafleet_gateway.tenancy.namespace import adapter_list_prefix, adapter_names, model_id

logger = logging.getLogger(__name__)

OWNER = "lorafleet"
_LATEST_SUFFIX = "/LATEST"
# Last resolutions kept for store outages (LRU): a bound on memory, far above the models one gateway serves.
_REMEMBERED_RESOLUTIONS = 10_000


@dataclass(frozen=True)
class ResolvedModel:
    """What a request's ``model`` names, for one tenant."""

    kind: Literal["base", "adapter"]
    adapter: str = ""  # "name@version" in the store, sent upstream; "" for the base model
    name: str = ""  # the store name of the adapter, or the base model id: a bounded metrics label


class ModelCatalog:
    """Resolves, lists and deletes a tenant's models. Store calls run in a thread (the store API is sync).

    Every request resolves its adapter's LATEST in the store. While the store is unreachable, a model
    resolved less than ``outage_grace_s`` ago is served as it was then resolved: published versions never
    change, and the replicas hold loaded adapters in memory and on disk, so an outage of the store need
    not stop traffic to adapters already in use. A model never resolved (or too long ago) gets 503.
    """

    def __init__(self, store: ObjectStore, base_model: str, *, outage_grace_s: float = 0.0) -> None:
        self._store = store
        self.base_model = base_model
        self._base = ResolvedModel("base", name=base_model)  # frozen: one for every request that names it
        self.outage_grace_s = outage_grace_s
        self._started = int(time.time())
        self._last: OrderedDict[tuple[str, str], tuple[ResolvedModel, float]] = OrderedDict()

    async def resolve(self, tenant: str, model: str) -> ResolvedModel:
        """The base model, or the tenant's adapter ("name" or "name@version") pinned to its version; else 404.

        Another tenant's adapter cannot be named: every candidate store name
        starts with the caller's tenant (see tenancy/namespace.py).
        """
        if model == self.base_model:
            return self._base
        try:
            resolved = await asyncio.to_thread(self._resolve_adapter, tenant, model)
        except StoreError as exc:
            last = self._last_resolution(tenant, model)
            if last is None:
                raise ServiceUnavailable(f"object store unavailable while resolving {model!r}: {exc}") from exc
            logger.warning(
                "object store unavailable (%s); serving %r as %s, its last resolution", exc, model, last.adapter
            )
            return last
        if resolved is None:
            self._last.pop((tenant, model), None)
            raise _not_found(model)
        if self.outage_grace_s > 0:
            self._last[(tenant, model)] = (resolved, time.monotonic())
            self._last.move_to_end((tenant, model))
            if len(self._last) > _REMEMBERED_RESOLUTIONS:
                self._last.popitem(last=False)
        return resolved

    def _last_resolution(self, tenant: str, model: str) -> ResolvedModel | None:
        entry = self._last.get((tenant, model))
        if entry is None or time.monotonic() - entry[1] > self.outage_grace_s:
            return None
        return entry[0]

    def _resolve_adapter(self, tenant: str, model: str) -> ResolvedModel | None:
        try:
            ref = parse_adapter_ref(model)
        except InvalidName:
            return None
        for name in adapter_names(tenant, ref.name):
            try:
                # Pin the version here so every replica serves the one LATEST named at request time.
                version = resolve_version(self._store, AdapterRef(validate_adapter_name(name), ref.version))
            except (AdapterNotFound, InvalidName):
                continue
            return ResolvedModel("adapter", f"{name}@{version}", name)
        return None

    def base_card(self) -> ModelCard:
        return ModelCard(id=self.base_model, created=self._started, owned_by=OWNER)

    async def list_models(self, tenant: str) -> list[ModelCard]:
        """The base model first, then the tenant's adapters that have a LATEST pointer, by id."""
        try:
            cards = await asyncio.to_thread(self._adapter_cards, tenant)
        except StoreError as exc:
            raise ServiceUnavailable(f"object store unavailable while listing models: {exc}") from exc
        return [self.base_card(), *cards]

    async def get(self, tenant: str, model: str) -> ModelCard:
        resolved = await self.resolve(tenant, model)
        if resolved.kind == "base":
            return self.base_card()
        name, _, version = resolved.adapter.partition("@")
        try:
            metadata = await asyncio.to_thread(read_metadata, self._store, name, version)
        except (AdapterNotFound, ValueError) as exc:
            raise _not_found(model) from exc
        except StoreError as exc:
            raise ServiceUnavailable(f"object store unavailable while reading {model!r}: {exc}") from exc
        return _card(model, tenant, metadata)

    async def delete(self, tenant: str, model: str) -> str:
        """Delete every version of the tenant's adapter ``model``; returns its store name."""
        if model == self.base_model:
            raise PermissionDenied("The base model cannot be deleted.", param="model")
        if "@" in model:
            raise InvalidRequest("Delete a model by its id, without '@version'.", param="model")
        resolved = await self.resolve(tenant, model)
        try:
            await asyncio.to_thread(_delete_adapter_files, self._store, resolved.name)
        except StoreError as exc:
            raise ServiceUnavailable(f"object store unavailable while deleting {model!r}: {exc}") from exc
        for remembered in [k for k, (r, _) in self._last.items() if k[0] == tenant and r.name == resolved.name]:
            del self._last[remembered]
        logger.info("tenant %s deleted model %s (%s)", tenant, model, resolved.name)
        return resolved.name

    def adapter_names(self, tenant: str) -> dict[str, str]:
        """The tenant's adapters with a LATEST pointer: model id -> store name (sync: call it in a thread)."""
        names = [
            key[len(ADAPTERS_PREFIX) + 1 : -len(_LATEST_SUFFIX)]
            for key in self._store.list(adapter_list_prefix(tenant))
            if key.endswith(_LATEST_SUFFIX)
        ]
        if tenant == DEFAULT_TENANT:
            names += [name for name in list_adapter_names(self._store) if "/" not in name]
        found: dict[str, str] = {}
        for name in names:
            visible = model_id(tenant, name)
            if visible is not None and visible not in found:  # not the tenant's; or a legacy twin of a namespaced one
                found[visible] = name
        return found

    def _adapter_cards(self, tenant: str) -> list[ModelCard]:
        cards: dict[str, ModelCard] = {}
        for visible, name in self.adapter_names(tenant).items():
            try:
                metadata = read_metadata(self._store, name, resolve_version(self._store, parse_adapter_ref(name)))
            except (AdapterNotFound, InvalidName, ValueError) as exc:
                # A half-deleted or hand-edited adapter must not break the listing.
                logger.warning("skipping adapter %r in /v1/models: %s", name, exc)
                continue
            cards[visible] = _card(visible, tenant, metadata)
        return [cards[k] for k in sorted(cards)]


def _card(model: str, tenant: str, metadata: AdapterMetadata) -> ModelCard:
    return ModelCard(id=model, created=int(metadata.created_at), owned_by=tenant, parent=metadata.base_model)


def _delete_adapter_files(store: ObjectStore, name: str) -> None:
    """Remove exactly this adapter: LATEST first (readers stop at once), then its versions' files.

    Not common.adapters.delete_adapter: that removes everything under the
    name's prefix, which would include nested adapters ("a" would take "a/b").
    """
    versions = f"{ADAPTERS_PREFIX}/{name}/versions/"
    keys = [k for k in store.list(versions) if k.startswith(versions) and len(k[len(versions) :].split("/")) == 2]
    store.delete(latest_key(name))
    for key in keys:
        store.delete(key)


def _not_found(model: str) -> ModelNotFound:
    return ModelNotFound(f"The model '{model}' does not exist", param="model")
