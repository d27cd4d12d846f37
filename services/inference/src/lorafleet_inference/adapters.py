"""Adapters on demand: resolve a name, fetch and validate it (``fetcher``), load it, evict it.

Three tiers, each LRU:

* gpu: the engine's ``max_loras`` LoRA slots. vLLM moves adapters in and out of
  them itself; ``GpuSlots`` mirrors its policy for metrics and Stats.
* cpu: adapters registered with the engine (``add_lora``), at most ``capacity``
  (= vLLM's ``max_cpu_loras``). The least recently used one that is neither pinned
  nor serving a request is removed to make room.
* disk: validated copies under ``cache_dir/<name>/<version>/`` (``DiskCache``),
  within a byte budget; only copies not registered with the engine are evicted.

Loads only ever read from the disk tier, filled from the object store by
AdapterFetcher; no caller-supplied path reaches the engine. Single flight:
concurrent first requests for one adapter share one fetch and one ``add_lora``
(a shared task, so a caller that goes away does not cancel the load for the others).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet_common.adapters import (
    AdapterMetadata,
    AdapterNotFound,
    resolve_version,
)
from lorafleet_common.names import AdapterRef, parse_adapter_ref
from lorafleet_common.store import ObjectStore, StoreUnavailable
from lorafleet_inference.disk_cache import DiskCache, DiskCacheFull
from lorafleet_inference.engine import Engine, make_lora_request
from lorafleet_inference.errors import AdapterRejected, CapacityExhausted, ServiceUnavailable
from lorafleet_inference.fetcher import AdapterFetcher
from lorafleet_inference.gpu_slots import GpuSlots
from lorafleet_inference.metrics import InferenceMetrics
from lorafleet_inference.singleflight import SingleFlight

log = logging.getLogger(__name__)

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
        gpu_slots: int | None = None,
        disk_budget_bytes: int | None = None,
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
        self.metrics = metrics or InferenceMetrics(memory=False)
        self._loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()  # the cpu tier, LRU order: oldest first
        self._ids: dict[str, int] = {}  # name@version -> engine int id, stable for the process
        self._next_id = itertools.count(first_lora_id)
        self._latest: dict[str, tuple[str, float]] = {}  # name -> (version, when read)
        self._rejected: dict[str, tuple[AdapterRejected, float]] = {}
        self._flights = SingleFlight()
        self._stage: dict[str, str] = {}  # what a load in flight is doing, for timeout messages
        self._registry_lock = asyncio.Lock()
        self._held: Counter[str] = Counter()  # disk copies read outside the engine (merged mode)
        self._slot_freed = asyncio.Event()
        self._adding = 0  # slots reserved by adds in flight to the engine
        self.gpu = GpuSlots(gpu_slots or capacity)
        self.disk = DiskCache(cache_dir, budget_bytes=disk_budget_bytes, in_use=self._keys_in_use, metrics=self.metrics)
        self.fetcher = AdapterFetcher(
            store, self.disk, base_model=base_model, max_rank=max_rank, store_timeout_s=store_timeout_s
        )
        self._update_gauges()

    # ----- public API -------------------------------------------------------------------------

    @asynccontextmanager
    async def use(self, ref: str) -> AsyncIterator[LoadedAdapter]:
        """The loaded adapter ``ref`` names, kept from eviction while the block runs (a Generate request)."""
        adapter = await self.load(ref, retry_rejected=False, count_lookup=True)
        self._activate(adapter.key)
        adapter.active += 1
        try:
            yield adapter
        finally:
            adapter.active -= 1
            if adapter.active == 0:
                self._slot_freed.set()

    async def load(
        self, ref: str, *, pin: bool = False, retry_rejected: bool = True, count_lookup: bool = False
    ) -> LoadedAdapter:
        """Resolve ``ref`` ("name" or "name@version") and make sure it is loaded; idempotent."""
        parsed = parse_adapter_ref(ref)
        version = await self._resolve(parsed)
        key = f"{parsed.name}@{version}"
        if count_lookup:
            self._count_lookup(key)
        while True:
            adapter = self._loaded.get(key)
            if adapter is None:
                if not retry_rejected:
                    self._raise_if_recently_rejected(key)
                adapter = await self._flights.run(key, lambda: self._fetch_and_add(parsed.name, version))
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

    async def resolve(self, ref: str) -> tuple[str, str]:
        """(name, version) that ``ref`` names now: an unversioned name's LATEST (cached for latest_ttl_s)."""
        parsed = parse_adapter_ref(ref)
        return parsed.name, await self._resolve(parsed)

    @asynccontextmanager
    async def validated_copy(self, ref: str) -> AsyncIterator[LoadedAdapter]:
        """``ref`` fetched and validated into the disk tier like a load (same checks), but not registered with
        the engine; its folder is kept from eviction while the block runs. For merged mode, which reads the
        files itself. ``lora_request`` is None."""
        name, version = await self.resolve(ref)
        key = f"{name}@{version}"
        loaded = self._loaded.get(key)
        if loaded is not None:  # registered: its disk copy is validated and protected already
            yield LoadedAdapter(name, version, loaded.lora_id, loaded.path, loaded.metadata, None)
            return
        self._held[key] += 1
        try:
            try:
                metadata = await asyncio.wait_for(self.fetcher.metadata(name, version), self.load_timeout_s)
                folder, _ = await asyncio.wait_for(self.fetcher.fetch(name, version, metadata), self.load_timeout_s)
            except TimeoutError as exc:
                raise ServiceUnavailable(f"fetching adapter {key} took longer than {self.load_timeout_s:g} s") from exc
            yield LoadedAdapter(name, version, 0, folder, metadata, None)
        finally:
            self._held[key] -= 1
            if not self._held[key]:
                del self._held[key]

    def loaded(self) -> list[LoadedAdapter]:
        """Loaded adapters, least recently used first."""
        return list(self._loaded.values())

    def tiers(self) -> dict[str, list[str]]:
        """``name@version`` of the adapters in each tier, least recently used first."""
        return {"gpu": self.gpu.keys(), "cpu": list(self._loaded), "disk": self.disk.keys()}

    async def preload(self, refs: list[str]) -> None:
        """Load and pin ``refs`` (settings.pinned_adapters); failures are logged, not raised."""
        for ref in refs:
            try:
                adapter = await self.load(ref, pin=True)
                log.info("pinned adapter %s", adapter.key)
            except Exception as exc:
                log.error("could not pin adapter %s at start-up: %s", ref, exc)

    # ----- tiers ------------------------------------------------------------------------------

    def _count_lookup(self, key: str) -> None:
        """Hits and misses of one request: gpu, then cpu, then disk (a miss falls through)."""
        for tier, present in (
            ("gpu", lambda: key in self.gpu),
            ("cpu", lambda: key in self._loaded),
            ("disk", lambda: self.disk.get(key) is not None),
        ):
            if present():
                self.metrics.adapter_cache_hits.labels(tier).inc()
                return
            self.metrics.adapter_cache_misses.labels(tier).inc()

    def _activate(self, key: str) -> None:
        if self.gpu.activate(key) is not None:
            self.metrics.adapter_evictions.labels("gpu").inc()
        self._update_gauges()

    def _keys_in_use(self) -> set[str]:
        """Versions whose disk copy must stay: registered with the engine, being loaded, or being merged."""
        in_flight = {k for k in self._flights.in_flight() if not k.startswith("latest:")}
        return set(self._loaded) | in_flight | set(self._held)

    def _update_gauges(self) -> None:
        self.metrics.adapters_cached.labels("gpu").set(len(self.gpu))
        self.metrics.adapters_cached.labels("cpu").set(len(self._loaded))

    def _record_load(self, tier: str, error: BaseException | None, started: float) -> None:
        self.metrics.adapter_loads.labels(tier, _load_result(error)).inc()
        self.metrics.adapter_load_seconds.labels(tier).observe(time.monotonic() - started)

    # ----- resolution -------------------------------------------------------------------------

    async def _resolve(self, ref: AdapterRef) -> str:
        if ref.version is not None:
            key = f"{ref.name}@{ref.version}"
            if key in self._loaded:
                return ref.version  # loaded means it was validated; no store round trip per request
            try:
                return await self.fetcher.store_call(resolve_version, self.store, ref)
            except (ServiceUnavailable, StoreUnavailable):
                if self.disk.get(key) is None:
                    raise
                return ref.version  # a validated copy is on disk: the load goes on from it (see fetcher.metadata)
        cached = self._latest.get(ref.name)
        if cached and time.monotonic() - cached[1] < self.latest_ttl_s:
            return cached[0]
        try:
            version: str = await self._flights.run(
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
            log.info("adapter %s load: %s in %.2f s", key, result, time.monotonic() - started)

    async def _fetch_and_add_unbounded(self, name: str, version: str) -> LoadedAdapter:
        key = f"{name}@{version}"
        self._stage[key] = "fetching and validating"
        started = time.monotonic()
        try:
            metadata = await self.fetcher.metadata(name, version)
            folder, from_disk = await self.fetcher.fetch(name, version, metadata)
        except BaseException as exc:
            self._record_load("disk", exc, started)
            raise
        if not from_disk:
            self._record_load("disk", None, started)
        lora_request = make_lora_request(key, self._ids.setdefault(key, next(self._next_id)), str(folder))
        adapter = LoadedAdapter(name, version, lora_request.lora_int_id, folder, metadata, lora_request)
        await self._register(adapter)
        return adapter

    async def _register(self, adapter: LoadedAdapter) -> None:
        """Make room if needed, then add the adapter to the engine and the LRU.

        The slot is reserved under the lock, but the engine call is made outside it: vLLM's engine takes
        ``add_lora`` calls between its steps, so adds made one after another wait a step each, while adds made
        together are taken back to back (H100, 24 new adapters in one burst during prefill: all loaded after
        3.8 s instead of 6.3 s; each add is ~0.14 s of the engine's own work, docs/benchmarks.md run 21)."""
        while True:
            async with self._registry_lock:
                occupied = len(self._loaded) + self._adding
                victim = self._eviction_candidate() if occupied >= self.capacity else None
                if occupied < self.capacity or victim is not None:
                    if victim is not None:
                        await self._remove(victim)
                        self.metrics.adapter_evictions.labels("cpu").inc()
                    self._adding += 1
                    break
                self._slot_freed.clear()
            self._stage[adapter.key] = _WAITING_FOR_SLOT
            await self._slot_freed.wait()  # bounded by load_timeout_s in _fetch_and_add
        self._stage[adapter.key] = "loading into the engine"
        started = time.monotonic()
        try:
            await self._add_to_engine(adapter)
        except BaseException as exc:
            self._slot_freed.set()  # the reserved slot is free again for whoever waits
            self._record_load("cpu", exc, started)
            raise
        finally:
            self._adding -= 1
        self._record_load("cpu", None, started)
        self._loaded[adapter.key] = adapter
        self._activate(adapter.key)  # vLLM's add_lora also activates it in a GPU slot

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
        """Drop an adapter from the engine and the LRU (its disk copy stays for a later reload)."""
        self._loaded.pop(adapter.key, None)
        self.gpu.discard(adapter.key)
        try:
            await self.engine.remove_lora(adapter.lora_id)
        except Exception:
            log.exception("remove_lora failed for %s", adapter.key)
        self._update_gauges()
        log.info("adapter %s unloaded", adapter.key)

    async def _engine_dead(self) -> bool:
        try:
            await asyncio.wait_for(self.engine.check_health(), 5.0)
            return False
        except Exception:
            return True


def _load_result(error: BaseException | None) -> str:
    """The ``result`` label of a tier load."""
    if error is None:
        return "ok"
    if isinstance(error, AdapterRejected):
        return "rejected"
    if isinstance(error, AdapterNotFound):
        return "not_found"
    if isinstance(error, DiskCacheFull):
        return "no_space"
    if isinstance(error, asyncio.CancelledError):
        return "timeout"  # load_timeout_s cancelled it (callers cannot: the load is shielded)
    return "error"
