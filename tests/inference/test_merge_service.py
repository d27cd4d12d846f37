"""MergeController against a real LocalStore and AdapterManager, with a fake engine whose workers can fail: the paths
the real engine cannot be made to take (a worker failing half way, a restore failing too, a busy prefix cache),
plus what an unversioned name means while merged. The real engine: test_merge_engine.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from lorafleet.inference.v1 import inference_pb2 as pb
from lorafleet_common.settings import EMBEDDED_BASE_MODEL
from lorafleet_common.store import LocalStore
from lorafleet_inference.adapters import AdapterManager
from lorafleet_inference.errors import ServiceUnavailable, ServingModeConflict
from lorafleet_inference.merge import MERGE_RPC, RESTORE_RPC, MergeController, MergePolicy
from lorafleet_inference.metrics import InferenceMetrics
from tests.inference.inference_helpers import FakeEngine, publish, write_adapter_dir

pytestmark = pytest.mark.timeout(60)


class FakeWorkers(FakeEngine):
    """The engine's side of a switch: records the RPCs, fails the ones it is told to."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.fail: set[str] = set()
        self.busy_prefix_resets = 0
        self.gate = asyncio.Event()  # cleared: RPCs wait for it
        self.gate.set()

    async def collective_rpc(
        self,
        method: str,
        timeout: float | None = None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]:
        self.calls.append(method)
        await self.gate.wait()
        if method in self.fail:
            raise RuntimeError(f"Call to collective_rpc method failed: {method} ran out of memory")
        return [{"merged": args[1] if method == MERGE_RPC else "", "refused": ""}]

    async def reset_prefix_cache(self) -> bool:
        self.calls.append("reset_prefix_cache")
        if self.busy_prefix_resets:
            self.busy_prefix_resets -= 1
            return False
        return True


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path / "store")
    folder = write_adapter_dir(tmp_path / "a")
    for version in ("v1", "v2"):
        publish(store, folder, "a", version)
    store.put("adapters/a/LATEST", b"v1")
    return store


def controller(store: LocalStore, engine: FakeWorkers, tmp_path: Path, **policy: Any) -> MergeController:
    adapters = AdapterManager(
        store,
        engine,
        cache_dir=tmp_path / "cache",
        base_model=EMBEDDED_BASE_MODEL,
        max_rank=16,
        capacity=4,
        latest_ttl_s=0,
    )
    idle = asyncio.Event()
    idle.set()

    async def wait_idle(timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    return MergeController(
        engine,
        adapters,
        MergePolicy(enabled=True, min_hold_s=0, **policy),
        wait_idle=wait_idle,
        in_flight=lambda: 0,
        metrics=InferenceMetrics(memory=False),
    )


async def until(condition: Any, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.001)


async def test_a_worker_failing_half_way_leaves_lora_mode_with_the_base_restored(
    store: LocalStore, tmp_path: Path
) -> None:
    engine = FakeWorkers()
    merge = controller(store, engine, tmp_path)
    engine.fail = {MERGE_RPC}
    with pytest.raises(ServiceUnavailable, match="ran out of memory.*base weights are restored.*LoRA mode"):
        await merge.switch("a")
    assert engine.calls == [MERGE_RPC, RESTORE_RPC, "reset_prefix_cache"]
    assert (merge.state, merge.merged) == (pb.MERGE_STATE_LORA, None)
    assert await merge.admit("") is None  # LoRA mode serves again
    assert merge.metrics.registry.get_sample_value("lorafleet_merge_switches_total", {"result": "error"}) == 1


async def test_a_failed_restore_leaves_a_replica_that_refuses_everything(store: LocalStore, tmp_path: Path) -> None:
    engine = FakeWorkers()
    merge = controller(store, engine, tmp_path)
    engine.fail = {MERGE_RPC, RESTORE_RPC}
    with pytest.raises(ServiceUnavailable, match="unknown state after a failed merge.*restart it"):
        await merge.switch("a")
    for call in (merge.admit(""), merge.admit("a"), merge.switch("")):
        with pytest.raises(ServiceUnavailable, match="restart it"):
            await call


async def test_an_unversioned_name_is_served_merged_only_while_latest_is_the_merged_version(
    store: LocalStore, tmp_path: Path
) -> None:
    merge = controller(store, FakeWorkers(), tmp_path)
    assert (await merge.switch("a")).merged_adapter == "a@v1"
    served = await merge.admit("a")
    assert served is not None and (served.key, served.lora_request) == ("a@v1", None)
    store.put("adapters/a/LATEST", b"v2")  # a new version published while merged
    with pytest.raises(
        ServingModeConflict, match="^replica is merged for a@v1: it serves only that adapter, not a@v2$"
    ):
        await merge.admit("a")
    assert (await merge.admit("a@v1")) is served


async def test_requests_wait_out_an_unmerge_and_a_busy_prefix_cache(store: LocalStore, tmp_path: Path) -> None:
    engine = FakeWorkers()
    merge = controller(store, engine, tmp_path)
    await merge.switch("a")
    engine.busy_prefix_resets = 3  # the engine frees the last requests' KV blocks a step late
    unmerging = asyncio.ensure_future(merge.switch(""))
    await until(lambda: merge.state == pb.MERGE_STATE_UNMERGING)
    waiting = asyncio.ensure_future(merge.admit("a@v2"))  # LoRA mode will serve it
    await until(lambda: merge.held == 1)
    assert (await unmerging).changed
    assert await waiting is None and merge.held == 0
    assert engine.calls.count("reset_prefix_cache") == 1 + 4
    stats = pb.StatsResponse()
    merge.fill_stats(stats)
    assert (stats.merge_state, stats.merged_adapter, stats.merged_for_s) == (pb.MERGE_STATE_LORA, "", 0)


async def test_a_caller_that_goes_away_does_not_stop_the_switch(store: LocalStore, tmp_path: Path) -> None:
    engine = FakeWorkers()
    merge = controller(store, engine, tmp_path)
    engine.gate.clear()
    call = asyncio.ensure_future(merge.switch("a"))
    await until(lambda: MERGE_RPC in engine.calls)
    call.cancel()  # the gateway's deadline, mid-way through the workers' update
    with pytest.raises(asyncio.CancelledError):
        await call
    with pytest.raises(ServingModeConflict, match="^replica is switching \\(merged mode for a@v1\\)"):
        await merge.switch("")
    engine.gate.set()
    await until(lambda: merge.state == pb.MERGE_STATE_MERGED)
    assert merge.merged is not None and merge.merged.key == "a@v1"
    assert (await merge.switch("a@v1")).changed is False
