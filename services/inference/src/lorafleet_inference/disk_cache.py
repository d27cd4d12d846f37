"""The disk tier: validated adapter versions under ``root/<name>/<version>/``, kept within a byte budget.

* An entry is a folder holding adapter_model.safetensors, adapter_config.json and
  metadata.json (the validated metadata). Folders only appear by an atomic rename
  from ``root/.tmp/``, so an entry is either complete or absent; the engine never
  reads ``.tmp``.
* The mtime of an entry's metadata.json records its last use, so the LRU order
  survives a restart; ``scan`` rebuilds the index from the folder at start-up.
* ``commit`` makes room before a new entry goes in: it evicts the least recently
  used entries that are not in use (registered with the engine, pinned, being
  loaded). If that cannot make room it raises DiskCacheFull and leaves every
  existing entry intact.
* Entries are removed by renaming them into ``.tmp`` first, so no reader ever sees
  half a folder.

One replica per cache folder: ``scan`` clears ``.tmp``, which another process could be using.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from lorafleet_common.adapters import METADATA_FILE, AdapterMetadata
from lorafleet_common.names import InvalidName, validate_adapter_name, validate_version
from lorafleet_inference.errors import CapacityExhausted
from lorafleet_inference.metrics import InferenceMetrics

log = logging.getLogger(__name__)

TMP_DIRNAME = ".tmp"


class DiskCacheFull(CapacityExhausted):
    """The disk tier cannot take an adapter: over budget with everything else in use, or the disk is full."""


@dataclass
class DiskEntry:
    """One validated adapter version on disk."""

    key: str
    path: Path
    size: int


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def format_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


class DiskCache:
    """Index and budget of the adapter folders on local disk (LRU, oldest first)."""

    def __init__(
        self,
        root: Path,
        *,
        budget_bytes: int | None,
        in_use: Callable[[], Iterable[str]] = frozenset,
        metrics: InferenceMetrics | None = None,
    ) -> None:
        self.root = root
        self.budget_bytes = budget_bytes
        self.in_use = in_use
        self.metrics = metrics
        self._entries: OrderedDict[str, DiskEntry] = OrderedDict()
        self._lock = asyncio.Lock()
        self.scan()

    # ----- index ------------------------------------------------------------------------------

    def scan(self) -> None:
        """Rebuild the index from the folder (start-up): committed entries by last use; clear ``.tmp``."""
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        found: list[tuple[float, DiskEntry]] = []
        for marker in self.root.rglob(METADATA_FILE):
            folder = marker.parent
            if TMP_DIRNAME in folder.relative_to(self.root).parts:
                continue
            key = self._key_of(folder)
            if key is None:
                log.warning("ignoring %s: not a cache entry this service wrote", folder)
                continue
            found.append((marker.stat().st_mtime, DiskEntry(key, folder, folder_size(folder))))
        self._entries = OrderedDict((e.key, e) for _, e in sorted(found, key=lambda pair: pair[0]))
        self._update_gauges()
        if found:
            log.info("adapter disk cache: %d versions, %s", len(found), format_bytes(self.total_bytes))

    def _key_of(self, folder: Path) -> str | None:
        """``name@version`` of an entry folder, if its place matches its metadata."""
        try:
            meta = AdapterMetadata.model_validate_json((folder / METADATA_FILE).read_bytes())
            validate_adapter_name(meta.name)
            validate_version(meta.version)
        except (OSError, ValidationError, InvalidName):
            return None
        return f"{meta.name}@{meta.version}" if folder == self.path_for(meta.name, meta.version) else None

    @property
    def tmp_dir(self) -> Path:
        return self.root / TMP_DIRNAME

    def path_for(self, name: str, version: str) -> Path:
        """Where ``name@version`` lives (both already validated: no '..', no absolute paths)."""
        return self.root / name / version

    def new_tmp(self) -> Path:
        return self.tmp_dir / uuid.uuid4().hex

    def get(self, key: str) -> DiskEntry | None:
        return self._entries.get(key)

    def keys(self) -> list[str]:
        """Entries, least recently used first."""
        return list(self._entries)

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self._entries.values())

    def touch(self, key: str) -> None:
        """Mark ``key`` used now (in memory and in the file's mtime, for the next start-up)."""
        entry = self._entries.get(key)
        if entry is None:
            return
        self._entries.move_to_end(key)
        now = time.time()
        try:
            os.utime(entry.path / METADATA_FILE, (now, now))
        except OSError:
            log.warning("could not record the use of %s", entry.path, exc_info=True)

    # ----- changes ----------------------------------------------------------------------------

    async def commit(self, tmp: Path, name: str, version: str) -> Path:
        """Move the validated folder ``tmp`` into place as ``name@version``, evicting LRU entries to fit."""
        key = f"{name}@{version}"
        final = self.path_for(name, version)
        size = await asyncio.to_thread(folder_size, tmp)
        async with self._lock:
            victims = self._victims_for(key, size)
            for victim in victims:
                await self._delete(victim, reason="budget")
            replaced = self._entries.pop(key, None)
            await asyncio.to_thread(_move_into_place, tmp, final, self.new_tmp(), self.root)
            self._entries[key] = DiskEntry(key, final, size)
            self.touch(key)
        if replaced is not None:
            log.warning("replaced the cached copy of %s (it no longer validated)", key)
        self._update_gauges()
        return final

    def _victims_for(self, key: str, size: int) -> list[DiskEntry]:
        """The LRU entries to delete so ``size`` more bytes fit the budget; DiskCacheFull if impossible."""
        if self.budget_bytes is None:
            return []
        protected = set(self.in_use()) | {key}
        current = self._entries.get(key)
        used = self.total_bytes - (current.size if current else 0)
        victims: list[DiskEntry] = []
        for entry in self._entries.values():
            if used + size <= self.budget_bytes:
                break
            if entry.key not in protected:
                victims.append(entry)
                used -= entry.size
        if used + size > self.budget_bytes:
            held = sum(e.size for e in self._entries.values() if e.key in protected and e.key != key)
            raise DiskCacheFull(
                f"the adapter disk cache cannot fit {key} ({format_bytes(size)}): its budget is "
                f"{format_bytes(self.budget_bytes)} and {format_bytes(held)} is held by adapters in use or pinned; "
                "unload adapters, or raise LORAFLEET_INFERENCE_ADAPTER_DISK_CACHE_BYTES"
            )
        return victims

    async def evict_unused(self) -> int:
        """Delete every entry not in use (the disk itself is full); returns the bytes freed."""
        async with self._lock:
            protected = set(self.in_use())
            victims = [e for e in self._entries.values() if e.key not in protected]
            for victim in victims:
                await self._delete(victim, reason="disk full")
        self._update_gauges()
        return sum(v.size for v in victims)

    async def drop(self, key: str, reason: str) -> None:
        """Delete one entry (e.g. a copy that no longer validates)."""
        async with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                await self._delete(entry, reason=reason, count=False)
        self._update_gauges()

    async def _delete(self, entry: DiskEntry, *, reason: str, count: bool = True) -> None:
        self._entries.pop(entry.key, None)
        await asyncio.to_thread(_remove_folder, entry.path, self.new_tmp(), self.root)
        if count and self.metrics is not None:
            self.metrics.adapter_evictions.labels("disk").inc()
        log.info("adapter %s evicted from the disk cache (%s, %s)", entry.key, reason, format_bytes(entry.size))

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.adapters_cached.labels("disk").set(len(self._entries))
            self.metrics.adapter_disk_cache_bytes.set(self.total_bytes)


def _move_into_place(tmp: Path, final: Path, trash: Path, root: Path) -> None:
    if final.exists():
        _remove_folder(final, trash, root)  # an older copy that no longer validates
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(final)


def _remove_folder(path: Path, trash: Path, root: Path) -> None:
    """Rename out of sight first (atomic), then delete: nobody sees half a folder."""
    try:
        path.rename(trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)
    # Remove the <name> folders the version leaves empty, up to (not including) the root.
    folder = path.parent
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
