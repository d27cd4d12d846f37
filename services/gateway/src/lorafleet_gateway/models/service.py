"""The model catalog: the base model plus every adapter published in the store."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Literal

from lorafleet_common.adapters import AdapterNotFound, list_adapter_names, read_metadata, resolve_version
from lorafleet_common.names import InvalidName, parse_adapter_ref
from lorafleet_common.store import ObjectStore, StoreError
from lorafleet_gateway.errors import ModelNotFound, ServiceUnavailable
from lorafleet_gateway.models.schemas import ModelCard

logger = logging.getLogger(__name__)

OWNER = "lorafleet"


@dataclass(frozen=True)
class ResolvedModel:
    """What a request's ``model`` names."""

    kind: Literal["base", "adapter"]
    adapter: str = ""  # "name@version" sent upstream; "" for the base model


class ModelCatalog:
    """Resolves model ids and lists them. Store calls run in a thread (the store API is sync)."""

    def __init__(self, store: ObjectStore, base_model: str) -> None:
        self._store = store
        self.base_model = base_model
        self._started = int(time.time())

    async def resolve(self, model: str) -> ResolvedModel:
        """The base model, or a published adapter ("name" or "name@version") pinned to its version; else 404."""
        if model == self.base_model:
            return ResolvedModel("base")
        try:
            ref = parse_adapter_ref(model)
        except InvalidName as exc:
            raise _not_found(model) from exc
        try:
            version = await asyncio.to_thread(resolve_version, self._store, ref)
        except (AdapterNotFound, InvalidName) as exc:
            raise _not_found(model) from exc
        except StoreError as exc:
            raise ServiceUnavailable(f"object store unavailable while resolving {model!r}: {exc}") from exc
        # Pin the version here so every replica serves the one LATEST named at request time.
        return ResolvedModel("adapter", f"{ref.name}@{version}")

    def base_card(self) -> ModelCard:
        return ModelCard(id=self.base_model, created=self._started, owned_by=OWNER)

    async def list_models(self) -> list[ModelCard]:
        """The base model first, then every adapter with a LATEST pointer, by name."""
        try:
            cards = await asyncio.to_thread(self._adapter_cards)
        except StoreError as exc:
            raise ServiceUnavailable(f"object store unavailable while listing models: {exc}") from exc
        return [self.base_card(), *cards]

    async def get(self, model: str) -> ModelCard:
        resolved = await self.resolve(model)
        if resolved.kind == "base":
            return self.base_card()
        name, _, version = resolved.adapter.partition("@")
        try:
            metadata = await asyncio.to_thread(read_metadata, self._store, name, version)
        except AdapterNotFound as exc:
            raise _not_found(model) from exc
        except StoreError as exc:
            raise ServiceUnavailable(f"object store unavailable while reading {model!r}: {exc}") from exc
        return ModelCard(id=model, created=int(metadata.created_at), owned_by=OWNER, parent=metadata.base_model)

    def _adapter_cards(self) -> list[ModelCard]:
        cards = []
        for name in list_adapter_names(self._store):
            try:
                ref = parse_adapter_ref(name)
                metadata = read_metadata(self._store, name, resolve_version(self._store, ref))
            except (AdapterNotFound, InvalidName, ValueError) as exc:
                # A half-deleted or hand-edited adapter must not break the listing.
                logger.warning("skipping adapter %r in /v1/models: %s", name, exc)
                continue
            cards.append(
                ModelCard(id=name, created=int(metadata.created_at), owned_by=OWNER, parent=metadata.base_model)
            )
        return cards


def _not_found(model: str) -> ModelNotFound:
    return ModelNotFound(f"The model '{model}' does not exist", param="model")
