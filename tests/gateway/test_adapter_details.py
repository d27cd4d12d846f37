"""/v1/lorafleet/adapters (versions, metadata, placement, traffic; tenant-scoped) and the admin's
/v1/admin/adapters/{id}/load|unload on every replica."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.gateway_fakes import publish_dummy_adapter
from tests.gateway.gateway_harness import ADAPTER, BASE_MODEL, Stack, publish_test_adapter, wait_for

CHAT = "/v1/chat/completions"


def chat(gw: Stack, key: str, model: str) -> int:
    with gw.gateway.http(api_key=key) as http:
        return http.post(CHAT, json={"model": model, "messages": [{"role": "user", "content": "hi there"}]}).status_code


@pytest.fixture
def tenant_bot(gw: Stack, tmp_path: Path) -> tuple[str, str]:
    """A fresh tenant with adapter "bot" in two versions (v2 latest); returns (tenant id, its key)."""
    key = gw.new_key(gw.new_tenant())
    tenant = key["tenant_id"]
    publish_test_adapter(gw.store, tmp_path / "v1", f"{tenant}/bot", "v1")
    publish_dummy_adapter(
        gw.store, f"{tenant}/bot", "v2", base_model=BASE_MODEL, job_id="ftjob-0a0b0c0d0e0f", final_loss=0.25
    )
    return tenant, key["key"]


def adapters(gw: Stack, key: str) -> dict[str, Any]:
    with gw.gateway.http(api_key=key) as http:
        response = http.get("/v1/lorafleet/adapters")
    assert response.status_code == 200, response.text
    return {a["id"]: a for a in response.json()["data"]}


def detail(gw: Stack, key: str, model: str) -> dict[str, Any]:
    with gw.gateway.http(api_key=key) as http:
        response = http.get(f"/v1/lorafleet/adapters/{model}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_versions_metadata_placement_and_traffic(gw: Stack, tenant_bot: tuple[str, str]) -> None:
    tenant, key = tenant_bot
    listed = adapters(gw, key)
    assert list(listed) == ["bot"]  # only the tenant's own; not the default tenant's self-cognition
    bot = detail(gw, key, "bot")
    assert bot == listed["bot"]
    assert (bot["object"], bot["owned_by"], bot["base_model"], bot["latest_version"]) == (
        "lorafleet.adapter",
        tenant,
        BASE_MODEL,
        "v2",
    )
    assert (bot["rank"], bot["alpha"], bot["target_modules"]) == (8, 32, ["q_proj", "v_proj"])
    assert (bot["system_prompt"], bot["job_id"], bot["final_loss"]) == ("You are Fleet.", "ftjob-0a0b0c0d0e0f", 0.25)
    assert [(v["version"], v["latest"]) for v in bot["versions"]] == [("v2", True), ("v1", False)]
    assert bot["loaded_on"] == []
    assert bot["traffic"] == {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0}

    assert chat(gw, key, "bot") == 200
    assert chat(gw, key, "bot@v1") == 200
    gw.replicas[0].mode = gw.replicas[1].mode = "invalid"  # the replica refuses: a 400 counted as an error
    assert chat(gw, key, "bot") == 400

    # Placement comes from the replicas' Stats, polled every health_interval_s.
    def loaded_versions() -> list[str]:
        return sorted(v for p in detail(gw, key, "bot")["loaded_on"] for v in p["versions"])

    assert wait_for(lambda: loaded_versions() == ["v1", "v2"])
    bot = detail(gw, key, "bot")
    assert bot["traffic"] == {"requests": 3, "errors": 1, "prompt_tokens": 6, "completion_tokens": 14}
    targets = {r.target for r in gw.gateway.app.state.services.pool.replicas}
    labels = {f"replica-{hashlib.sha256(t.encode()).hexdigest()[:8]}" for t in targets}
    # A tenant sees opaque replica ids, never the fleet's addresses.
    assert {p["replica"] for p in bot["loaded_on"]} <= labels


def test_admin_sees_replica_addresses_for_its_adapters(gw: Stack) -> None:
    assert chat(gw, "test-admin-key-0123456789", ADAPTER) == 200
    assert wait_for(lambda: bool(detail(gw, "test-admin-key-0123456789", ADAPTER)["loaded_on"]))
    placed = detail(gw, "test-admin-key-0123456789", ADAPTER)["loaded_on"]
    assert {p["replica"] for p in placed} <= set(gw.targets)


def test_other_tenants_adapter_is_a_plain_404(gw: Stack, tenant_bot: tuple[str, str]) -> None:
    tenant, _ = tenant_bot
    other = gw.new_key(gw.new_tenant())["key"]
    with gw.gateway.http(api_key=other) as http:
        theirs = [http.get(f"/v1/lorafleet/adapters/{m}") for m in ("bot", f"{tenant}/bot", "bot@v1")]
        missing = http.get("/v1/lorafleet/adapters/nobody")
        base = http.get(f"/v1/lorafleet/adapters/{BASE_MODEL}")
        listed = http.get("/v1/lorafleet/adapters").json()["data"]
    assert listed == []
    for response in (*theirs, missing, base):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found"
    assert [r.json()["error"]["message"].split("'")[2] for r in theirs] == [" does not exist"] * 3


def test_admin_load_and_unload_on_every_replica(gw: Stack, tenant_bot: tuple[str, str]) -> None:
    tenant, key = tenant_bot
    with gw.gateway.http() as admin:
        loaded = admin.post("/v1/admin/adapters/bot/load", json={"tenant": tenant, "pin": True})
        assert loaded.status_code == 200, loaded.text
        body = loaded.json()
        assert (body["object"], body["action"], body["adapter"]) == (
            "lorafleet.adapter.placement",
            "load",
            f"{tenant}/bot@v2",
        )
        assert sorted(r["replica"] for r in body["replicas"]) == sorted(gw.targets)
        assert all(r["ok"] and r["loaded"] and r["version"] == "v2" for r in body["replicas"])
        assert all(f"{tenant}/bot@v2" in r.loaded for r in gw.replicas)
        # Routing knows at once, without waiting for the next Stats poll.
        assert len(detail(gw, key, "bot")["loaded_on"]) == 2

        only_v1 = admin.post("/v1/admin/adapters/bot@v1/load", json={"tenant": tenant}).json()
        assert only_v1["adapter"] == f"{tenant}/bot@v1"
        one_version = admin.post("/v1/admin/adapters/bot@v1/unload", json={"tenant": tenant}).json()
        assert one_version["adapter"] == f"{tenant}/bot@v1"
        assert all(f"{tenant}/bot@v2" in r.loaded and f"{tenant}/bot@v1" not in r.loaded for r in gw.replicas)

        unloaded = admin.post("/v1/admin/adapters/bot/unload", json={"tenant": tenant}).json()
        assert unloaded["adapter"] == f"{tenant}/bot" and all(r["ok"] for r in unloaded["replicas"])
        assert all(not r.loaded for r in gw.replicas)
        assert detail(gw, key, "bot")["loaded_on"] == []

        # The admin's own (default tenant) adapter needs no tenant.
        assert admin.post(f"/v1/admin/adapters/{ADAPTER}/load").json()["adapter"] == f"{ADAPTER}@v1"


def test_load_reports_each_replica(gw: Stack, tenant_bot: tuple[str, str]) -> None:
    tenant, _ = tenant_bot
    gw.replicas[0].mode = "rejected"
    with gw.gateway.http() as admin:
        partial = admin.post("/v1/admin/adapters/bot/load", json={"tenant": tenant})
        assert partial.status_code == 200
        results = {r["replica"]: r for r in partial.json()["replicas"]}
        assert results[gw.targets[0]]["ok"] is False and "max_lora_rank" in results[gw.targets[0]]["error"]
        assert results[gw.targets[1]]["ok"] is True
        gw.replicas[1].mode = "rejected"
        refused = admin.post("/v1/admin/adapters/bot/load", json={"tenant": tenant})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "adapter_rejected"


def test_placement_errors(gw: Stack, tenant_bot: tuple[str, str]) -> None:
    tenant, key = tenant_bot
    with gw.gateway.http() as admin:
        base = admin.post(f"/v1/admin/adapters/{BASE_MODEL}/load")
        assert base.status_code == 400 and base.json()["error"]["param"] == "model"
        assert admin.post("/v1/admin/adapters/nope/load").status_code == 404
        assert admin.post("/v1/admin/adapters/bot/load").status_code == 404  # the default tenant has no "bot"
        typo = admin.post("/v1/admin/adapters/bot/load", json={"tenant": tenant, "pinned": True})
        assert typo.status_code == 400  # a strict extension object
    with gw.gateway.http(api_key=key) as http:
        forbidden = http.post("/v1/admin/adapters/bot/load", json={"tenant": tenant})
        assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "permission_denied"
    with gw.gateway.http(authorized=False) as http:
        assert http.post("/v1/admin/adapters/bot/unload").status_code == 401
    assert not any(r.loaded for r in gw.replicas)
