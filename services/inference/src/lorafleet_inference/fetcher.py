"""Copy a published adapter version into the disk tier, validated; nothing else reaches the engine.

A version is downloaded into ``<cache>/.tmp/``, validated, then committed to
``<cache>/<name>/<version>/`` by the DiskCache (which makes room within its byte
budget first), so the cache never holds a half-written or unvalidated adapter.
Only the weights (safetensors) and the config are downloaded: whatever else was
published, a pickle is never even fetched.

A copy already on disk is re-validated against the store's metadata before it is
used (sha256 included), except when this process validated it and its weights file
has not changed since: versions are immutable, and that keeps re-loads cheap. While
the store is unreachable, a copy on disk is checked against the metadata saved with
it when it was validated, so adapters this replica already holds keep loading.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import shutil
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
from lorafleet_common.store import ObjectStore, StoreUnavailable
from lorafleet_inference.disk_cache import DiskCache, DiskCacheFull, format_bytes
from lorafleet_inference.errors import AdapterRejected, ServiceUnavailable
from lorafleet_inference.validation import check_file_names, validate_adapter_dir

log = logging.getLogger(__name__)

T = TypeVar("T")


class AdapterFetcher:
    """Reads metadata from one object store and fills the disk tier with validated adapter folders."""

    def __init__(
        self, store: ObjectStore, disk: DiskCache, *, base_model: str, max_rank: int, store_timeout_s: float
    ) -> None:
        self.store = store
        self.disk = disk
        self.base_model = base_model
        self.max_rank = max_rank
        self.store_timeout_s = store_timeout_s
        # name@version -> (sha256, mtime_ns, size) of weights this process validated.
        self._validated: dict[str, tuple[str, int, int]] = {}

    async def store_call(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking store call on a thread, bounded by the store timeout."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args), self.store_timeout_s)
        except TimeoutError as exc:
            raise ServiceUnavailable(f"object store did not answer within {self.store_timeout_s:g} s") from exc

    async def metadata(self, name: str, version: str) -> AdapterMetadata:
        """The version's metadata from the store; from its validated disk copy while the store is unreachable."""
        try:
            return await self.store_call(read_metadata, self.store, name, version)
        except ValidationError as exc:
            raise AdapterRejected(f"{name}@{version}", [f"{METADATA_FILE} is invalid: {exc}"]) from exc
        except (StoreUnavailable, ServiceUnavailable):
            saved = self._saved_metadata(name, version)
            if saved is None:
                raise
            log.warning("object store unreachable; loading %s@%s from its validated disk copy", name, version)
            return saved

    def _saved_metadata(self, name: str, version: str) -> AdapterMetadata | None:
        """The metadata a disk-tier copy was validated against (written by ``fetch`` before the commit)."""
        entry = self.disk.get(f"{name}@{version}")
        if entry is None:
            return None
        try:
            saved = AdapterMetadata.model_validate_json((entry.path / METADATA_FILE).read_bytes())
        except (OSError, ValidationError):
            return None
        return saved if (saved.name, saved.version) == (name, version) else None

    async def fetch(self, name: str, version: str, metadata: AdapterMetadata) -> tuple[Path, bool]:
        """A validated folder for ``name@version`` in the disk tier, and whether it was there already."""
        key = f"{name}@{version}"
        entry = self.disk.get(key)
        if entry is not None:
            if await self._still_valid(key, entry.path, metadata):
                self.disk.touch(key)
                return entry.path, True
            await self.disk.drop(key, reason="no longer validates")
        prefix = version_prefix(name, version) + "/"
        listing = [k[len(prefix) :] for k in await self.store_call(self.store.list, prefix) if k.startswith(prefix)]
        problems = check_file_names(listing)
        if metadata.name != name or metadata.version != version:
            problems.append(f"{METADATA_FILE} names {metadata.name}@{metadata.version}, not {key}")
        if WEIGHTS_FILE not in listing or CONFIG_FILE not in listing:
            raise AdapterRejected(key, problems)
        tmp = self.disk.new_tmp()
        try:
            await self._download(key, prefix, tmp)
            (tmp / METADATA_FILE).write_text(metadata.model_dump_json(indent=2))
            problems += await asyncio.to_thread(self._validate, tmp, metadata)
            if problems:
                raise AdapterRejected(key, problems)
            final = await self.disk.commit(tmp, name, version)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._remember(key, final, metadata)
        return final, False

    async def _download(self, key: str, prefix: str, tmp: Path) -> None:
        """Only the two files the engine reads: never a pickle, whatever else was published.

        A full disk first evicts every unused cached adapter and retries once, then fails clearly.
        """
        for attempt in (1, 2):
            try:
                for filename in (WEIGHTS_FILE, CONFIG_FILE):
                    await self.store_call(self.store.download, f"{prefix}{filename}", tmp / filename)
                return
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                freed = await self.disk.evict_unused() if attempt == 1 else 0
                log.warning("no space left for %s in %s; evicted %s", key, self.disk.root, format_bytes(freed))
                if attempt == 2 or freed == 0:
                    raise DiskCacheFull(
                        f"no space left on the disk holding the adapter cache ({self.disk.root}) for {key}, "
                        "even after evicting every unused cached adapter; free disk space or unload adapters"
                    ) from exc

    def _validate(self, folder: Path, metadata: AdapterMetadata) -> list[str]:
        return validate_adapter_dir(
            folder, metadata=metadata, max_rank=self.max_rank, base_model=self.base_model, check_names=False
        )

    async def _still_valid(self, key: str, folder: Path, metadata: AdapterMetadata) -> bool:
        stamp = _stamp(folder / WEIGHTS_FILE)
        if stamp is not None and self._validated.get(key) == (metadata.sha256, *stamp):
            return True
        if await asyncio.to_thread(self._validate, folder, metadata):
            return False
        self._remember(key, folder, metadata)
        return True

    def _remember(self, key: str, folder: Path, metadata: AdapterMetadata) -> None:
        stamp = _stamp(folder / WEIGHTS_FILE)
        if stamp is not None:
            self._validated[key] = (metadata.sha256, *stamp)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size
