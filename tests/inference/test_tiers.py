"""The three adapter tiers with a real LocalStore and disk, and a fake engine: budgets, LRU, restart, full disks,
hit/miss/eviction metrics."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from lorafleet_common.store import LocalStore, StoreUnavailable
from lorafleet_inference.adapters import AdapterManager
from lorafleet_inference.disk_cache import DiskCacheFull, folder_size
from lorafleet_inference.errors import grpc_status
from lorafleet_inference.gpu_slots import GpuSlots
from lorafleet_inference.metrics import InferenceMetrics
from tests.inference.inference_helpers import FakeEngine, publish

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


class DiskStore(LocalStore):
    """A LocalStore that counts downloads and can make them fail as if the local disk were full."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.downloads: list[str] = []
        self.no_space_left = 0  # the next N downloads fail with ENOSPC

    def download(self, key: str, dest: Path) -> None:
        if self.no_space_left:
            self.no_space_left -= 1
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(b"partial")  # a half-written file, as a real full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device")
        self.downloads.append(key)
        super().download(key, dest)


@pytest.fixture
def store(tmp_path: Path) -> DiskStore:
    return DiskStore(tmp_path / "store")


@pytest.fixture
def names(store: DiskStore, adapter_dir: Callable[..., Path]) -> list[str]:
    folder = adapter_dir()
    for name in ("a", "b", "c"):
        publish(store, folder, name, "v1")
    return ["a", "b", "c"]


def manager(store: LocalStore, tmp_path: Path, **kwargs: Any) -> AdapterManager:
    options: dict[str, Any] = {"max_rank": 16, "capacity": 4, "load_timeout_s": 10.0, "metrics": InferenceMetrics()}
    options.update(kwargs)
    return AdapterManager(store, FakeEngine(), cache_dir=tmp_path / "cache", base_model=BASE, **options)


def sample(mgr: AdapterManager, name: str, **labels: str) -> float:
    value = mgr.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def entry_size(store: DiskStore, tmp_path: Path) -> int:
    """Bytes one of the test adapters takes in the disk tier."""
    probe = manager(store, tmp_path / "probe")
    adapter = await probe.load("a")
    return folder_size(adapter.path)


async def test_the_disk_budget_evicts_least_recently_used_versions_the_engine_does_not_hold(
    store: DiskStore, names: list[str], tmp_path: Path
) -> None:
    size = await entry_size(store, tmp_path)
    mgr = manager(store, tmp_path, capacity=1, disk_budget_bytes=int(size * 2.5))
    cache = tmp_path / "cache"
    await mgr.load("a")
    await mgr.load("b")  # the cpu tier (1) drops a; its disk copy stays
    assert mgr.disk.keys() == ["a@v1", "b@v1"] and [a.key for a in mgr.loaded()] == ["b@v1"]
    await mgr.load("c")  # the disk holds two: a is the oldest one not loaded
    assert mgr.disk.keys() == ["b@v1", "c@v1"]
    assert not (cache / "a").exists() and (cache / "b" / "v1").is_dir() and (cache / "c" / "v1").is_dir()
    assert mgr.disk.total_bytes <= int(size * 2.5)
    evictions = [sample(mgr, "lorafleet_adapter_evictions_total", tier=tier) for tier in ("disk", "cpu")]
    assert evictions == [1, 2]
    assert sample(mgr, "lorafleet_adapter_disk_cache_bytes") == mgr.disk.total_bytes
    downloads = len(store.downloads)
    await mgr.load("b")  # evicted from cpu, still on disk: no download
    assert len(store.downloads) == downloads
    await mgr.load("a")  # gone from disk: downloaded again; c (not loaded, oldest) makes room
    assert len(store.downloads) == downloads + 2 and mgr.disk.keys() == ["b@v1", "a@v1"]


async def test_a_full_disk_tier_fails_clearly_and_keeps_what_it_holds(
    store: DiskStore, names: list[str], tmp_path: Path
) -> None:
    size = await entry_size(store, tmp_path)
    mgr = manager(store, tmp_path, capacity=2, disk_budget_bytes=int(size * 1.5))
    a = await mgr.load("a")
    with pytest.raises(DiskCacheFull) as info:
        await mgr.load("b")  # a is registered with the engine, so its copy must stay
    assert grpc_status(info.value)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[index]
    message = str(info.value)
    assert "cannot fit b@v1" in message and "LORAFLEET_INFERENCE_ADAPTER_DISK_CACHE_BYTES" in message
    assert mgr.disk.keys() == ["a@v1"] and folder_size(a.path) == size  # intact
    assert list((tmp_path / "cache" / ".tmp").iterdir()) == []  # no half-written leftovers
    assert sample(mgr, "lorafleet_adapter_loads_total", tier="disk", result="no_space") == 1
    assert [x.key for x in mgr.loaded()] == ["a@v1"]  # the failure disturbed nothing else
    await mgr.unload("a")
    assert (await mgr.load("b")).key == "b@v1" and mgr.disk.keys() == ["b@v1"]


async def test_no_space_on_the_device_evicts_unused_copies_then_retries_or_fails_clearly(
    store: DiskStore, names: list[str], tmp_path: Path
) -> None:
    mgr = manager(store, tmp_path, capacity=1)
    await mgr.load("a")
    await mgr.load("b")  # a now only on disk
    store.no_space_left = 1
    assert (await mgr.load("c")).key == "c@v1"  # ENOSPC -> a's copy deleted (b is loaded) -> retried
    assert mgr.disk.keys() == ["b@v1", "c@v1"]
    store.no_space_left = 10
    with pytest.raises(DiskCacheFull, match="no space left on the disk") as info:
        await mgr.load("a")  # b's copy is freed, the disk is still full: a clear RESOURCE_EXHAUSTED
    assert grpc_status(info.value)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[index]
    assert list((tmp_path / "cache" / ".tmp").iterdir()) == []
    assert [x.key for x in mgr.loaded()] == ["c@v1"] and mgr.disk.keys() == ["c@v1"]


async def test_the_disk_tier_survives_a_restart_in_lru_order(
    store: DiskStore, names: list[str], tmp_path: Path
) -> None:
    first = manager(store, tmp_path, capacity=1)
    for name in ("a", "b", "c", "a"):  # a is reloaded from disk last: most recently used
        await first.load(name)
    assert first.disk.keys() == ["b@v1", "c@v1", "a@v1"]
    stale = tmp_path / "cache" / ".tmp" / "crashed-download"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    downloads = len(store.downloads)
    second = manager(store, tmp_path, capacity=1)  # a restarted replica on the same cache folder
    assert second.disk.keys() == ["b@v1", "c@v1", "a@v1"]
    assert not stale.exists()
    assert (await second.load("b")).path == tmp_path / "cache" / "b" / "v1"
    assert len(store.downloads) == downloads  # served from the disk tier, validated again, not re-fetched


async def test_a_tampered_disk_copy_is_replaced_from_the_store(
    store: DiskStore, names: list[str], tmp_path: Path
) -> None:
    mgr = manager(store, tmp_path, capacity=1)
    a = await mgr.load("a")
    await mgr.load("b")
    weights = a.path / "adapter_model.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)  # same size; a restarted process would not trust mtime
    restarted = manager(store, tmp_path, capacity=1)
    downloads = len(store.downloads)
    reloaded = await restarted.load("a")
    assert len(store.downloads) == downloads + 2
    assert reloaded.path.is_dir() and weights.read_bytes() != b"\0" * weights.stat().st_size


async def test_hits_misses_and_evictions_per_tier(store: DiskStore, names: list[str], tmp_path: Path) -> None:
    mgr = manager(store, tmp_path, capacity=2, gpu_slots=1)

    async def request(ref: str) -> None:
        async with mgr.use(ref):
            pass

    def counts(metric: str) -> dict[str, float]:
        return {tier: sample(mgr, metric, tier=tier) for tier in ("gpu", "cpu", "disk")}

    await request("a")  # nowhere yet: a miss in every tier
    await request("a")  # in the engine's slot
    await request("b")  # cold again; b takes the only gpu slot
    await request("a")  # registered (cpu) but not in a slot
    await mgr.unload("a")
    await request("a")  # only on disk now
    assert counts("lorafleet_adapter_cache_hits_total") == {"gpu": 1, "cpu": 1, "disk": 1}
    assert counts("lorafleet_adapter_cache_misses_total") == {"gpu": 4, "cpu": 3, "disk": 2}
    assert counts("lorafleet_adapter_evictions_total") == {"gpu": 2, "cpu": 0, "disk": 0}
    assert sample(mgr, "lorafleet_adapter_loads_total", tier="disk", result="ok") == 2
    assert sample(mgr, "lorafleet_adapter_loads_total", tier="cpu", result="ok") == 3
    assert sample(mgr, "lorafleet_adapter_load_seconds_count", tier="cpu") == 3
    assert mgr.tiers() == {"gpu": ["a@v1"], "cpu": ["b@v1", "a@v1"], "disk": ["b@v1", "a@v1"]}
    assert counts("lorafleet_adapters_cached") == {"gpu": 1, "cpu": 2, "disk": 2}


async def test_startup_pins_load_and_survive_pressure(store: DiskStore, names: list[str], tmp_path: Path) -> None:
    mgr = manager(store, tmp_path, capacity=2)
    await mgr.preload(["a", "no-such-adapter"])  # the unknown one is logged, not fatal
    assert [(x.key, x.pinned) for x in mgr.loaded()] == [("a@v1", True)]
    await mgr.load("b")
    await mgr.load("c")  # b goes, the pinned a stays
    assert [x.key for x in mgr.loaded()] == ["a@v1", "c@v1"]


def test_gpu_slots_mirror_an_lru() -> None:
    slots = GpuSlots(2)
    assert [slots.activate(k) for k in ("a", "b", "a", "c")] == [None, None, None, "b"]
    assert slots.keys() == ["a", "c"] and "b" not in slots
    slots.discard("a")
    assert slots.activate("d") is None and slots.keys() == ["c", "d"]


def test_memory_metrics_fall_back_to_the_process_tree_without_a_gpu() -> None:
    metrics = InferenceMetrics()
    used = metrics.registry.get_sample_value("lorafleet_gpu_memory_used_bytes", {"device": "cpu"})
    total = metrics.registry.get_sample_value("lorafleet_gpu_memory_total_bytes", {"device": "cpu"})
    assert used is not None and total is not None and 0 < used < total


def test_disk_scan_ignores_folders_it_did_not_write(tmp_path: Path) -> None:
    from lorafleet_inference.disk_cache import DiskCache

    stray = tmp_path / "cache" / "x" / "v1"
    stray.mkdir(parents=True)
    (stray / "metadata.json").write_text('{"name": "other", "version": "v1"}')
    os.utime(stray / "metadata.json")
    assert DiskCache(tmp_path / "cache", budget_bytes=None).keys() == []


class OutageStore(DiskStore):
    """A DiskStore that can be made unreachable, as an S3 server that stopped."""

    down = False

    def _check(self, key: str) -> None:
        if self.down:
            raise StoreUnavailable(f"object store unreachable reading {key}: connection refused")

    def get(self, key: str) -> bytes:
        self._check(key)
        return super().get(key)

    def exists(self, key: str) -> bool:
        self._check(key)
        return super().exists(key)

    def list(self, prefix: str) -> list[str]:
        self._check(prefix)
        return super().list(prefix)


async def test_copies_on_disk_load_while_the_store_is_down(adapter_dir: Callable[..., Path], tmp_path: Path) -> None:
    """A version the replica validated before reloads from its disk copy during a store outage (it used to need
    the store's metadata first); one it never fetched is UNAVAILABLE, and nothing of it is left on disk."""
    store = OutageStore(tmp_path / "store")
    folder = adapter_dir()
    for name in ("a", "b", "c"):
        publish(store, folder, name, "v1")
    mgr = manager(store, tmp_path, capacity=1)
    await mgr.load("a@v1")
    await mgr.load("b@v1")  # a now only on disk
    store.down = True
    assert (await mgr.load("a@v1")).key == "a@v1"
    with pytest.raises(StoreUnavailable) as info:
        await mgr.load("c@v1")
    assert grpc_status(info.value)[0] == grpc.StatusCode.UNAVAILABLE  # type: ignore[index]
    assert mgr.disk.keys() == ["b@v1", "a@v1"] and list((tmp_path / "cache" / ".tmp").iterdir()) == []
    # A copy tampered with meanwhile is not trusted on the strength of its own metadata.json.
    (mgr.disk.path_for("b", "v1") / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(StoreUnavailable):
        await mgr.load("b@v1")
    store.down = False
    assert (await mgr.load("c@v1")).key == "c@v1"
