"""The model catalog while the object store is unreachable (the end-to-end run against a stopped S3 server is
tests/e2e/test_faults_serving.py::test_store_outage_during_adapter_loads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet_common.store import LocalStore, StoreUnavailable
from lorafleet_gateway.errors import ModelNotFound, ServiceUnavailable
from lorafleet_gateway.models.service import ModelCatalog
from tests.gateway.gateway_harness import BASE_MODEL, publish_test_adapter


class SwitchableStore(LocalStore):
    """A LocalStore that can be made unreachable, as an S3 server that stopped."""

    down = False

    def get(self, key: str) -> bytes:
        if self.down:
            raise StoreUnavailable(f"object store unreachable reading {key}: connection refused")
        return super().get(key)


@pytest.fixture
def store(tmp_path: Path) -> SwitchableStore:
    store = SwitchableStore(tmp_path / "store")
    publish_test_adapter(store, tmp_path / "a", "t1/used", "v1")
    publish_test_adapter(store, tmp_path / "b", "t1/unused", "v1")
    return store


async def test_models_resolved_before_an_outage_are_served_during_it(
    store: SwitchableStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = ModelCatalog(store, BASE_MODEL, outage_grace_s=600)
    assert (await catalog.resolve("t1", "used")).adapter == "t1/used@v1"
    store.down = True
    assert (await catalog.resolve("t1", "used")).adapter == "t1/used@v1"
    assert (await catalog.resolve("t1", BASE_MODEL)).kind == "base"
    with pytest.raises(ServiceUnavailable, match="object store unavailable while resolving 'unused'"):
        await catalog.resolve("t1", "unused")
    with pytest.raises(ServiceUnavailable):  # another tenant never resolved it: nothing to fall back on
        await catalog.resolve("t2", "used")

    # Past the grace period the last resolution is not trusted any more.
    import lorafleet_gateway.models.service as service

    later = service.time.monotonic() + 601
    monkeypatch.setattr(service.time, "monotonic", lambda: later)
    with pytest.raises(ServiceUnavailable):
        await catalog.resolve("t1", "used")


async def test_without_a_grace_period_every_adapter_request_needs_the_store(store: SwitchableStore) -> None:
    catalog = ModelCatalog(store, BASE_MODEL, outage_grace_s=0)
    await catalog.resolve("t1", "used")
    store.down = True
    with pytest.raises(ServiceUnavailable):
        await catalog.resolve("t1", "used")


async def test_a_deleted_model_is_not_served_from_memory(store: SwitchableStore) -> None:
    catalog = ModelCatalog(store, BASE_MODEL, outage_grace_s=600)
    await catalog.resolve("t1", "used")
    await catalog.delete("t1", "used")
    with pytest.raises(ModelNotFound):
        await catalog.resolve("t1", "used")
    store.down = True
    with pytest.raises(ServiceUnavailable):
        await catalog.resolve("t1", "used")
