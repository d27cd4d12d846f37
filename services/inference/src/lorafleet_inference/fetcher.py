"""Copy a published adapter version into the managed cache, validated; nothing else reaches the engine.

A version is downloaded into a temporary folder, validated, then renamed to
``cache_dir/<name>/<version>/``, so the cache never holds a half-written or
unvalidated adapter. Only the weights (safetensors) and the config are
downloaded: whatever else was published, a pickle is never even fetched.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from lorafleet_common.adapters import (
    CONFIG_FILE,
    METADATA_FILE,
    WEIGHTS_FILE,
    AdapterMetadata,
    read_metadata,
    version_prefix,
)
from lorafleet_common.store import ObjectStore
from lorafleet_inference.errors import AdapterRejected, ServiceUnavailable
from lorafleet_inference.validation import check_file_names, validate_adapter_dir

T = TypeVar("T")


class AdapterFetcher:
    """Reads metadata and fetches validated adapter folders from one object store."""

    def __init__(
        self, store: ObjectStore, cache_dir: Path, *, base_model: str, max_rank: int, store_timeout_s: float
    ) -> None:
        self.store = store
        self.cache_dir = cache_dir
        self.base_model = base_model
        self.max_rank = max_rank
        self.store_timeout_s = store_timeout_s

    async def store_call(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking store call on a thread, bounded by the store timeout."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args), self.store_timeout_s)
        except TimeoutError as exc:
            raise ServiceUnavailable(f"object store did not answer within {self.store_timeout_s:g} s") from exc

    async def metadata(self, name: str, version: str) -> AdapterMetadata:
        try:
            return await self.store_call(read_metadata, self.store, name, version)
        except ValidationError as exc:
            raise AdapterRejected(f"{name}@{version}", [f"{METADATA_FILE} is invalid: {exc}"]) from exc

    async def fetch(self, name: str, version: str, metadata: AdapterMetadata) -> Path:
        """Make ``cache_dir/<name>/<version>`` hold a validated copy of the version; return it."""
        key = f"{name}@{version}"
        prefix = version_prefix(name, version) + "/"
        listing = [k[len(prefix) :] for k in await self.store_call(self.store.list, prefix) if k.startswith(prefix)]
        problems = check_file_names(listing)
        if metadata.name != name or metadata.version != version:
            problems.append(f"{METADATA_FILE} names {metadata.name}@{metadata.version}, not {key}")
        final = self.cache_dir / name / version
        validate = self._validator(metadata)
        if final.is_dir() and not problems and not await asyncio.to_thread(validate, final):
            return final  # a validated copy from earlier (versions are immutable)
        if WEIGHTS_FILE not in listing or CONFIG_FILE not in listing:
            raise AdapterRejected(key, problems)
        tmp = self.cache_dir / ".tmp" / f"{uuid.uuid4().hex}"
        try:
            # Only the two files the engine reads: never a pickle, whatever else was published.
            for filename in (WEIGHTS_FILE, CONFIG_FILE):
                await self.store_call(self.store.download, f"{prefix}{filename}", tmp / filename)
            (tmp / METADATA_FILE).write_text(metadata.model_dump_json(indent=2))
            problems += await asyncio.to_thread(validate, tmp)
            if problems:
                raise AdapterRejected(key, problems)
            await asyncio.to_thread(_move_into_place, tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _validator(self, metadata: AdapterMetadata) -> Callable[[Path], list[str]]:
        def validate(folder: Path) -> list[str]:
            return validate_adapter_dir(
                folder, metadata=metadata, max_rank=self.max_rank, base_model=self.base_model, check_names=False
            )

        return validate


def _move_into_place(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)  # an older copy that no longer validates
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(final)
