"""Adapters on demand: resolve a name, fetch and validate it (``fetcher``), load it, evict it.

* Loads only ever read from ``cache_dir/<name>/<version>/``, filled from the
  object store by AdapterFetcher; no caller-supplied path reaches the engine.
* Single flight: concurrent first requests for one adapter share one fetch and
  one ``add_lora`` (a shared task, so a caller that goes away does not cancel
  the load for the others).
* At most ``capacity`` adapters stay registered with the engine; the least
  recently used one that is neither pinned nor serving a request is evicted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lorafleet_common.adapters import (
    AdapterMetadata,
    AdapterNotFound,
    resolve_version,
)
from lorafleet_common.names import AdapterRef, parse_adapter_ref
from lorafleet_common.store import ObjectStore, StoreUnavailable
from lorafleet_inference.engine import Engine, make_lora_request
from lorafleet_inference.errors import AdapterRejected, CapacityExhausted, ServiceUnavailable
from lorafleet_inference.fetcher import AdapterFetcher
from lorafleet_inference.metrics import InferenceMetrics

log = logging.getLogger(__name__)

T = TypeVar("T")

# A version that failed validation is refused from memory for this long (versions are immutable;
# a short TTL still lets a re-published fix through). LoadAdapter always retries.
REJECTION_TTL_S = 30.0
_WAITING_FOR_SLOT = "waiting for a free adapter slot"


@dataclass
class LoadedAdapter:
    """An adapter registered with the engine."""

    name: str
    version: str
    lora_id: int
    path: Path
    metadata: AdapterMetadata
    lora_request: Any
    pinned: bool = False
    active: int = field(default=0, compare=False)

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


class AdapterManager:
    """Resolves, fetches, validates, loads and evicts the adapters of one engine."""

    def __init__(
        self,
        store: ObjectStore,
        engine: Engine,
        *,
        cache_dir: Path,
        base_model: str,
        max_rank: int,
        capacity: int,
        store_timeout_s: float = 30.0,
        load_timeout_s: float = 120.0,
        latest_ttl_s: float = 5.0,
        metrics: InferenceMetrics | None = None,
        first_lora_id: int = 1,
    ) -> None:
        self.store = store
        self.engine = engine
        self.capacity = capacity
        self.store_timeout_s = store_timeout_s
        self.load_timeout_s = load_timeout_s
        self.latest_ttl_s = latest_ttl_s
        self.metrics = metrics
        self.fetcher = AdapterFetcher(
            store, cache_dir, base_model=base_model, max_rank=max_rank, store_timeout_s=store_timeout_s
        )
        self._loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()  # LRU order: oldest first
        self._ids: dict[str, int] = {}  # name@version -> engine int id, stable for the process
        self._next_id = itertools.count(first_lora_id)
        self._latest: dict[str, tuple[str, float]] = {}  # name -> (version, when read)
        self._rejected: dict[str, tuple[AdapterRejected, float]] = {}
        self._inflight: dict[str, asyncio.Task[Any]] = {}
        self._stage: dict[str, str] = {}  # what a load in flight is doing, for timeout messages
        self._registry_lock = asyncio.Lock()
        self._slot_freed = asyncio.Event()

    # ----- public API -------------------------------------------------------------------------

    @asynccontextmanager
    async def use(self, ref: str) -> AsyncIterator[LoadedAdapter]:
        """The loaded adapter ``ref`` names, kept from eviction while the block runs."""
        adapter = await self.load(ref, retry_rejected=False)
        adapter.active += 1
        try:
            yield adapter
        finally:
            adapter.active -= 1
            if adapter.active == 0:
                self._slot_freed.set()

    async def load(self, ref: str, *, pin: bool = False, retry_rejected: bool = True) -> LoadedAdapter:
        """Resolve ``ref`` ("name" or "name@version") and make sure it is loaded; idempotent."""
        parsed = parse_adapter_ref(ref)
        version = await self._resolve(parsed)
        key = f"{parsed.name}@{version}"
        while True:
            adapter = self._loaded.get(key)
            if adapter is None:
                if not retry_rejected:
                    self._raise_if_recently_rejected(key)
                adapter = await self._single_flight(key, lambda: self._fetch_and_add(parsed.name, version))
            # Between the load finishing and this waiter resuming, the adapter may have been evicted.
            if self._loaded.get(key) is adapter:
                break
        self._loaded.move_to_end(key)
        if pin and not adapter.pinned:
            pinned = sum(a.pinned for a in self._loaded.values())
            if pinned + 1 >= self.capacity:
                raise CapacityExhausted(
                    f"cannot pin {key}: {pinned} of {self.capacity} adapter slots are pinned "
                    "and one must stay free for unpinned adapters"
                )
            adapter.pinned = True
        return adapter

    async def unload(self, ref: str) -> bool:
        """Remove ``name@version``, or every loaded version of ``name``; False if nothing was loaded."""
        parsed = parse_adapter_ref(ref)
        self._latest.pop(parsed.name, None)
        async with self._registry_lock:
            victims = [
                a
                for a in self._loaded.values()
                if a.name == parsed.name and (parsed.version is None or a.version == parsed.version)
            ]
            for adapter in victims:
                await self._remove(adapter)
        return bool(victims)

    def loaded(self) -> list[LoadedAdapter]:
        """Loaded adapters, least recently used first."""
        return list(self._loaded.values())

    # ----- resolution -------------------------------------------------------------------------

    async def _resolve(self, ref: AdapterRef) -> str:
        if ref.version is not None:
            if f"{ref.name}@{ref.version}" in self._loaded:
                return ref.version  # loaded means it was validated; no store round trip per request
            return await self.fetcher.store_call(resolve_version, self.store, ref)
        cached = self._latest.get(ref.name)
        if cached and time.monotonic() - cached[1] < self.latest_ttl_s:
            return cached[0]
        try:
            version: str = await self._single_flight(
                f"latest:{ref.name}", lambda: self.fetcher.store_call(resolve_version, self.store, ref)
            )
        except (ServiceUnavailable, StoreUnavailable):
            if cached is None:
                raise
            log.warning("store unavailable; serving %s@%s from the last LATEST read", ref.name, cached[0])
            return cached[0]
        self._latest[ref.name] = (version, time.monotonic())
        return version

    def _raise_if_recently_rejected(self, key: str) -> None:
        entry = self._rejected.get(key)
        if entry is not None:
            if time.monotonic() - entry[1] < REJECTION_TTL_S:
                raise AdapterRejected(entry[0].ref, entry[0].problems)  # a fresh one: tracebacks would pile up
            del self._rejected[key]

    # ----- fetch, validate, load --------------------------------------------------------------

    async def _fetch_and_add(self, name: str, version: str) -> LoadedAdapter:
        key = f"{name}@{version}"
        started = time.monotonic()
        result = "error"
        try:
            adapter = await asyncio.wait_for(self._fetch_and_add_unbounded(name, version), self.load_timeout_s)
            result = "ok"
            return adapter
        except AdapterRejected as exc:
            result = "rejected"
            self._rejected[key] = (exc, time.monotonic())
            raise
        except AdapterNotFound:
            result = "not_found"
            raise
        except TimeoutError as exc:
            if self._stage.get(key) == _WAITING_FOR_SLOT:
                raise CapacityExhausted(
                    f"all {self.capacity} adapter slots are pinned or serving requests; "
                    f"no slot for {key} freed up within {self.load_timeout_s:g} s"
                ) from exc
            raise ServiceUnavailable(
                f"loading adapter {key} took longer than {self.load_timeout_s:g} s ({self._stage.get(key)})"
            ) from exc
        finally:
            self._stage.pop(key, None)
            if self.metrics is not None:
                self.metrics.adapter_loads.labels(result).inc()
                self.metrics.adapter_load_seconds.observe(time.monotonic() - started)
                self.metrics.adapters_loaded.set(len(self._loaded))
            log.info("adapter %s load: %s in %.2f s", key, result, time.monotonic() - started)

    async def _fetch_and_add_unbounded(self, name: str, version: str) -> LoadedAdapter:
        key = f"{name}@{version}"
        self._stage[key] = "reading metadata"
        metadata = await self.fetcher.metadata(name, version)
        self._stage[key] = "fetching and validating"
        folder = await self.fetcher.fetch(name, version, metadata)
        lora_request = make_lora_request(key, self._ids.setdefault(key, next(self._next_id)), str(folder))
        adapter = LoadedAdapter(name, version, lora_request.lora_int_id, folder, metadata, lora_request)
        await self._register(adapter)
        return adapter

    async def _register(self, adapter: LoadedAdapter) -> None:
        """Make room if needed, then add the adapter to the engine and the LRU."""
        while True:
            async with self._registry_lock:
                victim = self._eviction_candidate() if len(self._loaded) >= self.capacity else None
                if len(self._loaded) < self.capacity or victim is not None:
                    if victim is not None:
                        await self._remove(victim)
                    self._stage[adapter.key] = "loading into the engine"
                    await self._add_to_engine(adapter)
                    self._loaded[adapter.key] = adapter
                    return
                self._slot_freed.clear()
            self._stage[adapter.key] = _WAITING_FOR_SLOT
            await self._slot_freed.wait()  # bounded by load_timeout_s in _fetch_and_add

    def _eviction_candidate(self) -> LoadedAdapter | None:
        return next((a for a in self._loaded.values() if not a.pinned and a.active == 0), None)

    async def _add_to_engine(self, adapter: LoadedAdapter) -> None:
        try:
            added = await self.engine.add_lora(adapter.lora_request)
        except Exception as exc:
            if await self._engine_dead():
                raise ServiceUnavailable(f"the engine failed while loading {adapter.key}: {exc}") from exc
            raise AdapterRejected(adapter.key, [f"the engine could not load it: {exc}"]) from exc
        if added is False:
            raise AdapterRejected(adapter.key, ["the engine refused to load it"])

    async def _remove(self, adapter: LoadedAdapter) -> None:
        """Drop an adapter from the engine and the LRU (its cached files stay for a later reload)."""
        self._loaded.pop(adapter.key, None)
        try:
            await self.engine.remove_lora(adapter.lora_id)
        except Exception:
            log.exception("remove_lora failed for %s", adapter.key)
        if self.metrics is not None:
            self.metrics.adapters_loaded.set(len(self._loaded))
        log.info("adapter %s unloaded", adapter.key)

    async def _engine_dead(self) -> bool:
        try:
            await asyncio.wait_for(self.engine.check_health(), 5.0)
            return False
        except Exception:
            return True

    # ----- helpers ----------------------------------------------------------------------------

    async def _single_flight(self, key: str, start: Callable[[], Awaitable[T]]) -> T:
        """Run ``start()`` once for all concurrent callers with the same key."""
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(start())
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._finish_flight(key, t))
        # shield: a caller that is cancelled stops waiting; the shared work goes on for the others.
        result: T = await asyncio.shield(task)
        return result

    def _finish_flight(self, key: str, task: asyncio.Task[Any]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: waiters may all have gone away
