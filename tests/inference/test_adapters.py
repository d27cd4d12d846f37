"""AdapterManager against a real LocalStore and a fake engine: names, fetch, validation, single flight, LRU."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from lorafleet_common.adapters import AdapterNotFound
from lorafleet_common.names import InvalidName
from lorafleet_common.store import LocalStore, StoreUnavailable
from lorafleet_inference.adapters import AdapterManager
from lorafleet_inference.errors import AdapterRejected, CapacityExhausted, grpc_status
from tests.inference.inference_helpers import EvilPickle, FakeEngine, publish

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


class CountingStore(LocalStore):
    """A LocalStore that counts downloads and can be switched off."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.downloads: list[str] = []
        self.down = False

    def download(self, key: str, dest: Path) -> None:
        self._check()
        self.downloads.append(key)
        super().download(key, dest)

    def get(self, key: str) -> bytes:
        self._check()
        return super().get(key)

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("store is down")


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    return CountingStore(tmp_path / "store")


def manager(store: LocalStore, engine: FakeEngine, tmp_path: Path, **kwargs: Any) -> AdapterManager:
    options: dict[str, Any] = {"max_rank": 16, "capacity": 4, "load_timeout_s": 10.0}
    options.update(kwargs)
    return AdapterManager(store, engine, cache_dir=tmp_path / "cache", base_model=BASE, **options)


@pytest.mark.parametrize(
    "ref", ["../x", "/abs", "a/../../b", "x" * 300, "%2e%2e", "a@../b", "a@", "a\\b", "", "a//b", ".hidden"]
)
async def test_bad_names_are_refused_before_any_store_call(ref: str, store: CountingStore, tmp_path: Path) -> None:
    store.down = True  # any store call would fail with UNAVAILABLE instead
    with pytest.raises(InvalidName) as info:
        await manager(store, FakeEngine(), tmp_path).load(ref)
    assert grpc_status(info.value) is not None
    assert grpc_status(info.value)[0] == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[index]


async def test_unknown_adapter_and_version_are_not_found(
    store: CountingStore, tmp_path: Path, adapter_dir: Callable[..., Path]
) -> None:
    publish(store, adapter_dir(), "known", "v1")
    mgr = manager(store, FakeEngine(), tmp_path)
    for ref in ("nope", "known@v2"):
        with pytest.raises(AdapterNotFound) as info:
            await mgr.load(ref)
        assert grpc_status(info.value)[0] == grpc.StatusCode.NOT_FOUND  # type: ignore[index]


async def test_load_fetches_into_the_managed_cache(
    store: CountingStore, tmp_path: Path, adapter_dir: Callable[..., Path]
) -> None:
    publish(store, adapter_dir(), "team/helper", "v1", system_prompt="You are Helper.")
    engine = FakeEngine()
    adapter = await manager(store, engine, tmp_path).load("team/helper")
    assert (adapter.key, adapter.lora_id, adapter.metadata.system_prompt) == ("team/helper@v1", 1, "You are Helper.")
    assert adapter.path == tmp_path / "cache" / "team" / "helper" / "v1"
    assert sorted(p.name for p in adapter.path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metadata.json",
    ]
    assert engine.added[0].lora_path == str(adapter.path)
    assert not list((tmp_path / "cache" / ".tmp").iterdir())


async def test_published_pickle_is_refused_and_never_downloaded(
    store: CountingStore, tmp_path: Path, adapter_dir: Callable[..., Path]
) -> None:
    folder = adapter_dir()
    marker = tmp_path / "pwned"
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(EvilPickle(marker)))
    publish(store, folder, "sneaky", "v1")
    engine = FakeEngine()
    with pytest.raises(AdapterRejected) as info:
        await manager(store, engine, tmp_path).load("sneaky")
    assert any("adapter_model.bin" in p for p in info.value.problems)
    assert grpc_status(info.value)[0] == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[index]
    assert not any(k.endswith(".bin") for k in store.downloads)
    assert not marker.exists() and engine.added == []
    assert not (tmp_path / "cache" / "sneaky").exists()


async def test_every_problem_is_reported_and_nothing_is_loaded(
    store: CountingStore, tmp_path: Path, adapter_dir: Callable[..., Path]
) -> None:
    publish(store, adapter_dir(rank=32, config={"use_dora": True}), "bad", "v1", sha256="00" * 32, base_model="x/y")
    engine = FakeEngine()
    with pytest.raises(AdapterRejected) as info:
        await manager(store, engine, tmp_path).load("bad@v1")
    message = str(info.value)
    for needle in ("rank 32", "DoRA", "sha256", "'x/y'"):
        assert needle in message
    assert engine.added == [] and not (tmp_path / "cache" / "bad").exists()


async def test_a_recent_rejection_is_remembered_for_requests_but_load_retries(
    store: CountingStore, tmp_path: Path, adapter_dir: Callable[..., Path]
) -> None:
    publish(store, adapter_dir(rank=32), "bad", "v1")
    mgr = manager(store, FakeEngine(), tmp_path)
    with pytest.raises(AdapterRejected):
        await mgr.load("bad")
    fetched = len(store.downloads)
    with pytest.raises(AdapterRejected):
        async with mgr.use("bad"):
            pass
    assert len(store.downloads) == fetched  # served from the rejection memory
    with pytest.raises(AdapterRejected):
        await mgr.load("bad")
    assert len(store.downloads) > fetched


async def test_concurrent_first_requests_share_one_download_and_one_add(
    store: CountingStore, tmp_path: Path, adapter_dir: Callable[..., Path]
) -> None:
    publish(store, adapter_dir(), "popular", "v1")
    engine = FakeEngine(add_delay_s=0.05)
    mgr = manager(store, engine, tmp_path)

    async def request() -> int:
        async with mgr.use("popular") as adapter:
            await asyncio.sleep(0.01)
            return adapter.lora_id

    ids = await asyncio.gather(*(request() for _ in range(100)))
    assert set(ids) == {1}
    assert len(engine.added) == 1
    assert sorted(store.downloads) == [
        "adapters/popular/versions/v1/adapter_config.json",
        "adapters/popular/versions/v1/adapter_model.safetensors",
    ]


async def test_different_adapters_go_to_the_engine_together_within_capacity(
    store: CountingStore, tmp_path: Path, adapter_dir: Callable[..., Path]
) -> None:
    """vLLM takes add_lora calls between engine steps: adds must not queue behind each other (or a lock)."""
    folder = adapter_dir()
    names = [f"m{i}" for i in range(6)]
    for name in names:
        publish(store, folder, name, "v1")
    engine = FakeEngine(add_delay_s=0.2)
    in_flight, most = 0, 0
    add = engine.add_lora

    async def counting_add(lora_request: Any) -> bool:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            return await add(lora_request)
        finally:
            in_flight -= 1

    engine.add_lora = counting_add  # type: ignore[method-assign]
    mgr = manager(store, engine, tmp_path, capacity=4)
    loaded = await asyncio.gather(*(mgr.load(name) for name in names[:4]))
    assert most == 4 and len(engine.added) == 4 and {a.key for a in loaded} == {f"{n}@v1" for n in names[:4]}
    # full: the next two evict one idle adapter each; capacity holds while adds are in flight
    most = 0
    await asyncio.gather(*(mgr.load(name) for name in names[4:]))
    assert len(mgr.loaded()) == 4 and len(engine.removed) == 2 and most == 2


async def test_a_failed_add_gives_its_reserved_slot_back(
    store: CountingStore, tmp_path: Path, adapter_dir: Callable[..., Path]
) -> None:
    folder = adapter_dir()
    for name in ("a", "b"):
        publish(store, folder, name, "v1")
    engine = FakeEngine(fail_add=True)
    mgr = manager(store, engine, tmp_path, capacity=1, load_timeout_s=0.5)
    with pytest.raises(AdapterRejected):
        await mgr.load("a")
    engine.fail_add = False
    assert (await mgr.load("b")).key == "b@v1"  # the one slot was not kept by the failed add


async def test_a_cancelled_first_caller_does_not_cancel_the_load(
    store: CountingStore, tmp_path: Path, adapter_dir: Callable[..., Path]
) -> None:
    publish(store, adapter_dir(), "a", "v1")
    engine = FakeEngine(add_delay_s=0.2)
    mgr = manager(store, engine, tmp_path)
    first = asyncio.ensure_future(mgr.load("a"))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(mgr.load("a"))
    first.cancel()
    assert (await second).key == "a@v1"
    assert len(engine.added) == 1


async def test_lru_eviction_keeps_ids_stable_and_spares_pinned_and_busy(
    store: CountingStore, tmp_path: Path, adapter_dir: Callable[..., Path]
) -> None:
    folder = adapter_dir()
    for name in ("a", "b", "c", "d"):
        publish(store, folder, name, "v1")
    engine = FakeEngine()
    mgr = manager(store, engine, tmp_path, capacity=3)
    a = await mgr.load("a", pin=True)
    b = await mgr.load("b")
    async with mgr.use("b"):
        await mgr.load("c")
        d = await mgr.load("d")  # a is pinned and b is busy: c goes
    assert [x.key for x in mgr.loaded()] == ["a@v1", "b@v1", "d@v1"]
    assert engine.removed == [3] and d.lora_id == 4
    c_again = await mgr.load("c")  # now b is idle and least recently used
    assert c_again.lora_id == 3 and engine.removed == [3, b.lora_id]
    assert a.pinned and [x.key for x in mgr.loaded()] == ["a@v1", "d@v1", "c@v1"]
    assert len(store.downloads) == 8  # c came back from the local cache, not the store


async def test_pins_leave_one_slot_and_a_full_cache_reports_resource_exhausted(
    store: CountingStore, tmp_path: Path, adapter_dir: Callable[..., Path]
) -> None:
    folder = adapter_dir()
    for name in ("a", "b", "c"):
        publish(store, folder, name, "v1")
    mgr = manager(store, FakeEngine(), tmp_path, capacity=2, load_timeout_s=0.3)
    await mgr.load("a", pin=True)
    with pytest.raises(CapacityExhausted):
        await mgr.load("b", pin=True)
    async with mgr.use("b"):
        with pytest.raises(CapacityExhausted) as info:
            await mgr.load("c")  # a pinned, b busy, no slot frees up in time
    assert grpc_status(info.value)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[index]
    assert (await mgr.load("c")).key == "c@v1"


async def test_a_load_waits_for_a_busy_slot_to_free(
    store: CountingStore, tmp_path: Path, adapter_dir: Callable[..., Path]
) -> None:
    folder = adapter_dir()
    for name in ("a", "b"):
        publish(store, folder, name, "v1")
    mgr = manager(store, FakeEngine(), tmp_path, capacity=1)

    async def hold_a() -> None:
        async with mgr.use("a"):
            await asyncio.sleep(0.2)

    holder = asyncio.ensure_future(hold_a())
    await asyncio.sleep(0.05)
    assert (await mgr.load("b")).key == "b@v1"
    await holder


async def test_unload_by_name_or_version(
    store: CountingStore, tmp_path: Path, adapter_dir: Callable[..., Path]
) -> None:
    folder = adapter_dir()
    publish(store, folder, "a", "v1")
    publish(store, folder, "a", "v2")
    engine = FakeEngine()
    mgr = manager(store, engine, tmp_path)
    await mgr.load("a@v1")
    await mgr.load("a@v2")
    assert await mgr.unload("a@v1") is True
    assert await mgr.unload("a@v1") is False
    assert await mgr.unload("a") is True and mgr.loaded() == []
    assert sorted(engine.removed) == [1, 2]


async def test_latest_is_cached_briefly_and_survives_a_store_outage(
    store: CountingStore, tmp_path: Path, adapter_dir: Callable[..., Path]
) -> None:
    folder = adapter_dir()
    publish(store, folder, "a", "v1")
    mgr = manager(store, FakeEngine(), tmp_path, latest_ttl_s=0.0)
    assert (await mgr.load("a")).version == "v1"
    publish(store, folder, "a", "v2")
    assert (await mgr.load("a")).version == "v2"
    store.down = True
    assert (await mgr.load("a")).version == "v2"  # stale LATEST, already loaded: still served
    assert (await mgr.load("a@v1")).version == "v1"  # loaded versions need no store call


async def test_engine_refusal_is_a_rejection_and_leaves_others_alone(
    store: CountingStore, tmp_path: Path, adapter_dir: Callable[..., Path]
) -> None:
    folder = adapter_dir()
    publish(store, folder, "good", "v1")
    publish(store, folder, "bad", "v1")
    engine = FakeEngine()
    mgr = manager(store, engine, tmp_path)
    await mgr.load("good")
    engine.fail_add = True
    with pytest.raises(AdapterRejected, match="engine could not load it"):
        await mgr.load("bad")
    assert [a.key for a in mgr.loaded()] == ["good@v1"]
