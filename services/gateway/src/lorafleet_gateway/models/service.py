"""The model catalog of one tenant: the base model plus the tenant's adapters in the store."""

from __future__ import annotations

import asyncio
import logging
import time
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


@dataclass(frozen=True)
class ResolvedModel:
    """What a request's ``model`` names, for one tenant."""

    kind: Literal["base", "adapter"]
    adapter: str = ""  # "name@version" in the store, sent upstream; "" for the base model
    name: str = ""  # the store name of the adapter, or the base model id: a bounded metrics label


class ModelCatalog:
    """Resolves, lists and deletes a tenant's models. Store calls run in a thread (the store API is sync)."""

    def __init__(self, store: ObjectStore, base_model: str) -> None:
        self._store = store
        self.base_model = base_model
        self._started = int(time.time())

    async def resolve(self, tenant: str, model: str) -> ResolvedModel:
        """The base model, or the tenant's adapter ("name" or "name@version") pinned to its version; else 404.

        Another tenant's adapter cannot be named: every candidate store name
        starts with the caller's tenant (see tenancy/namespace.py).
        """
        if model == self.base_model:
            return ResolvedModel("base", name=self.base_model)
        try:
            resolved = await asyncio.to_thread(self._resolve_adapter, tenant, model)
        except StoreError as exc:
            raise ServiceUnavailable(f"object store unavailable while resolving {model!r}: {exc}") from exc
        if resolved is None:
            raise _not_found(model)
        return resolved

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
