"""Tenants and keys through the admin API, and tenant isolation: another tenant's adapters, files and jobs
answer exactly as missing ones do."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.gateway.gateway_harness import ADAPTER, ADMIN_KEY, BASE_MODEL, Stack, publish_test_adapter
from tests.gateway.test_files_fine_tuning import JSONL

CHAT = "/v1/chat/completions"


def chat_body(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def as_tenant(gw: Stack, key: dict[str, Any]) -> httpx.Client:
    return gw.gateway.http(api_key=key["key"])


def answer(response: httpx.Response) -> tuple[int, Any]:
    return response.status_code, response.json()


def test_tenant_and_key_lifecycle(gw: Stack) -> None:
    tenant_id = gw.new_tenant(rpm_limit=1000)
    with gw.gateway.http() as admin:
        tenant = admin.get(f"/v1/admin/tenants/{tenant_id}").json()
        assert tenant == {
            "id": tenant_id,
            "object": "tenant",
            "name": f"Tenant {tenant_id}",
            "created_at": tenant["created_at"],
            "disabled": False,
            "rpm_limit": 1000,
            "tpm_limit": None,
        }
        listed = admin.get("/v1/admin/tenants").json()
        assert listed["object"] == "list" and {"default", tenant_id} <= {t["id"] for t in listed["data"]}

        created = admin.post(f"/v1/admin/tenants/{tenant_id}/keys", json={"name": "ci"})
        assert created.status_code == 201
        key = created.json()
        assert key["key"].startswith("lf-") and len(key["key"]) > 40
        assert key["prefix"] == key["key"][:11] and key["tenant_id"] == tenant_id and key["revoked_at"] is None
        keys = admin.get(f"/v1/admin/tenants/{tenant_id}/keys").json()["data"]
        assert [k["id"] for k in keys] == [key["id"]]
        assert keys[0]["key"] is None and key["key"] not in json.dumps(keys)  # secrets are shown once

    client = gw.gateway.client(api_key=key["key"])
    assert [m.id for m in client.models.list()] == [BASE_MODEL]
    assert client.chat.completions.create(**chat_body(BASE_MODEL)).choices[0].message.content  # type: ignore[arg-type]

    with gw.gateway.http() as admin:  # disable: the tenant's keys stop working at once ...
        assert admin.delete(f"/v1/admin/tenants/{tenant_id}").json()["disabled"] is True
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    with gw.gateway.http() as admin:  # ... and work again when re-enabled
        assert admin.patch(f"/v1/admin/tenants/{tenant_id}", json={"disabled": False}).json()["disabled"] is False
    assert client.models.list().data

    with gw.gateway.http() as admin:  # revoke: 401 at once, and the record says when
        revoked = admin.delete(f"/v1/admin/keys/{key['id']}").json()
        assert isinstance(revoked["revoked_at"], int) and revoked["key"] is None
        assert admin.delete(f"/v1/admin/keys/{key['id']}").json()["revoked_at"] == revoked["revoked_at"]
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert caught.value.code == "invalid_api_key"
    with as_tenant(gw, key) as http:
        assert http.post(CHAT, json=chat_body(BASE_MODEL)).status_code == 401


def test_admin_api_errors(gw: Stack) -> None:
    tenant_id = gw.new_tenant()
    key = gw.new_key(tenant_id)
    with gw.gateway.http() as admin:
        conflict = admin.post("/v1/admin/tenants", json={"id": tenant_id, "name": "again"})
        assert answer(conflict)[0] == 409 and conflict.json()["error"]["code"] == "already_exists"
        assert admin.post("/v1/admin/tenants", json={"id": "default", "name": "x"}).status_code == 409
        for bad in ({"id": "Bad_Id", "name": "x"}, {"name": ""}, {"id": "ok", "name": "x", "rpm_limit": 0}):
            response = admin.post("/v1/admin/tenants", json=bad)
            assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
        assert admin.post("/v1/admin/tenants", json={"name": "x", "typo": 1}).status_code == 400  # strict
        derived = admin.post("/v1/admin/tenants", json={"name": f"Acme {tenant_id} Corp."}).json()
        assert derived["id"] == f"acme-{tenant_id}-corp"
        assert admin.get("/v1/admin/tenants/nope").status_code == 404
        assert admin.post("/v1/admin/tenants/nope/keys", json={}).status_code == 404
        assert admin.get("/v1/admin/tenants/nope/keys").status_code == 404
        assert admin.delete("/v1/admin/keys/key_0000000000000000").status_code == 404
        assert admin.delete("/v1/admin/tenants/default").status_code == 400  # the admin key's own tenant
    # A tenant key is no admin: 403 (the routes are public knowledge; see auth.require_admin).
    with as_tenant(gw, key) as http:
        for method, path in (("GET", "/v1/admin/tenants"), ("POST", f"/v1/admin/tenants/{tenant_id}/keys")):
            response = http.request(method, path, json={})
            assert response.status_code == 403
            assert response.json()["error"] == {
                "message": "This endpoint needs the admin API key.",
                "type": "invalid_request_error",
                "param": None,
                "code": "permission_denied",
            }
        bad_json = http.post("/v1/admin/tenants", content=b"{nope", headers={"Content-Type": "application/json"})
        assert bad_json.status_code == 403  # not even the admin API's schema errors
    with gw.gateway.http(authorized=False) as http:
        assert http.get("/v1/admin/tenants").status_code == 401
    # Unknown lf- keys are 401 like any wrong key.
    with gw.gateway.http(api_key="lf-" + "x" * 43) as http:
        assert http.get("/v1/models").status_code == 401


def test_keys_are_stored_hashed(gw: Stack) -> None:
    key = gw.new_key(gw.new_tenant())
    path = gw.store.root.parent / "gateway.db"  # the default: sqlite:///<home>/gateway.db
    db = b"".join(p.read_bytes() for p in path.parent.glob("gateway.db*"))  # with any -wal / -journal
    assert path.exists()
    assert key["key"].encode() not in db
    assert key["key"][11:].encode() not in db  # not even the part after the displayed prefix
    assert hashlib.sha256(key["key"].encode()).hexdigest().encode() in db
    assert ADMIN_KEY.encode() not in db


@pytest.fixture
def two_tenants(gw: Stack) -> tuple[dict[str, Any], dict[str, Any]]:
    return gw.new_key(gw.new_tenant()), gw.new_key(gw.new_tenant())


def test_adapters_are_private_to_their_tenant(
    gw: Stack, two_tenants: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path
) -> None:
    a, b = two_tenants
    # Before A has it, B asking for "private-bot" is a plain miss; remember exactly what B saw.
    with as_tenant(gw, b) as http:
        before = {
            "chat": answer(http.post(CHAT, json=chat_body("private-bot"))),
            "retrieve": answer(http.get("/v1/models/private-bot")),
            "delete": answer(http.delete("/v1/models/private-bot")),
        }
    assert before["chat"][0] == 404 and before["chat"][1]["error"]["code"] == "model_not_found"
    publish_test_adapter(gw.store, tmp_path / "a", f"{a['tenant_id']}/private-bot", "v1")

    client_a = gw.gateway.client(api_key=a["key"])
    assert [m.id for m in client_a.models.list()] == [BASE_MODEL, "private-bot"]
    card = client_a.models.retrieve("private-bot")
    assert card.owned_by == a["tenant_id"] and card.model_dump().get("parent") == BASE_MODEL
    reply = client_a.chat.completions.create(**chat_body("private-bot"))  # type: ignore[arg-type]
    assert reply.model == "private-bot"
    assert gw.all_requests()[-1].adapter == f"{a['tenant_id']}/private-bot@v1"  # the namespaced name upstream

    with as_tenant(gw, b) as http:
        after = {
            "chat": answer(http.post(CHAT, json=chat_body("private-bot"))),
            "retrieve": answer(http.get("/v1/models/private-bot")),
            "delete": answer(http.delete("/v1/models/private-bot")),
        }
        assert after == before  # byte for byte what a missing model answers
        # Naming A's namespace explicitly does not reach it either.
        for model in (f"{a['tenant_id']}/private-bot", f"{a['tenant_id']}/private-bot@v1"):
            assert http.post(CHAT, json=chat_body(model)).status_code == 404
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [BASE_MODEL]
    # Nor can the admin key (the default tenant) see or use it; it sees its own legacy adapter.
    with gw.gateway.http() as admin:
        assert "private-bot" not in [m["id"] for m in admin.get("/v1/models").json()["data"]]
        assert ADAPTER in [m["id"] for m in admin.get("/v1/models").json()["data"]]
        assert admin.post(CHAT, json=chat_body("private-bot")).status_code == 404
    # And A cannot use the default tenant's adapter.
    with as_tenant(gw, a) as http:
        assert http.post(CHAT, json=chat_body(ADAPTER)).status_code == 404
    assert gw.store.exists(f"adapters/{a['tenant_id']}/private-bot/LATEST")  # B's delete did nothing


def test_delete_model(gw: Stack, two_tenants: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path) -> None:
    a, _ = two_tenants
    tenant = a["tenant_id"]
    publish_test_adapter(gw.store, tmp_path / "x", f"{tenant}/to-delete", "v1")
    publish_test_adapter(gw.store, tmp_path / "y", f"{tenant}/to-delete/nested", "v1")  # must survive
    client = gw.gateway.client(api_key=a["key"])
    client.chat.completions.create(**chat_body("to-delete"))  # type: ignore[arg-type]

    deleted = client.models.delete("to-delete")
    assert (deleted.id, deleted.deleted, deleted.object) == ("to-delete", True, "model")
    assert not gw.store.exists(f"adapters/{tenant}/to-delete/LATEST")
    assert not gw.store.list(f"adapters/{tenant}/to-delete/versions/")
    assert gw.store.exists(f"adapters/{tenant}/to-delete/nested/LATEST")
    assert all(r.unloaded == [f"{tenant}/to-delete"] for r in gw.replicas)  # every replica asked to unload
    assert [m.id for m in client.models.list()] == [BASE_MODEL, "to-delete/nested"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(**chat_body("to-delete"))  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        client.models.delete("to-delete")
    with pytest.raises(openai.PermissionDeniedError):
        client.models.delete(BASE_MODEL)
    with pytest.raises(openai.BadRequestError):
        client.models.delete("to-delete/nested@v1")


def test_files_are_private_to_their_tenant(gw: Stack, two_tenants: tuple[dict[str, Any], dict[str, Any]]) -> None:
    a, b = two_tenants
    client_a, client_b = (gw.gateway.client(api_key=k["key"]) for k in (a, b))
    file_id = client_a.files.create(file=("a.jsonl", io.BytesIO(JSONL)), purpose="fine-tune").id
    assert gw.store.exists(f"files/{a['tenant_id']}/{file_id}")
    assert [f.id for f in client_b.files.list()] == []
    assert file_id in [f.id for f in client_a.files.list()]
    paths = (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content")
    with as_tenant(gw, b) as http:
        seen_by_b = [answer(http.get(p)) for p in paths] + [answer(http.delete(paths[0]))]
        job = http.post("/v1/fine_tuning/jobs", json={"model": BASE_MODEL, "training_file": file_id})
        assert answer(job)[0] == 400 and answer(job)[1]["error"]["param"] == "training_file"
    assert client_a.files.retrieve(file_id).id == file_id  # B's delete did nothing
    client_a.files.delete(file_id)
    with as_tenant(gw, a) as http:  # now it is missing for A too: the same answers B got
        assert [answer(http.get(p)) for p in paths] + [answer(http.delete(paths[0]))] == seen_by_b
    assert all(status == 404 for status, _ in seen_by_b)


def test_jobs_are_private_to_their_tenant(gw: Stack, two_tenants: tuple[dict[str, Any], dict[str, Any]]) -> None:
    a, b = two_tenants
    tenant = a["tenant_id"]
    client_a = gw.gateway.client(api_key=a["key"])
    file_id = client_a.files.create(file=("a.jsonl", io.BytesIO(JSONL)), purpose="fine-tune").id
    job = client_a.fine_tuning.jobs.create(model=BASE_MODEL, training_file=file_id, suffix="bot")
    short = job.id.removeprefix("ftjob-")
    request = gw.trainer.create_requests[-1]
    assert request.labels["tenant"] == tenant and request.manifest_uri == f"manifests/{tenant}/{job.id}.json"
    manifest = json.loads(gw.store.get(request.manifest_uri))
    assert manifest["adapter_name"] == f"{tenant}/ft:smollm2-135m-instruct:{tenant}:bot:{short}"
    assert manifest["datasets"][0]["uri"] == f"files/{tenant}/{file_id}"

    missing = "ftjob-000000000000"
    routes = ("", "/events", "/checkpoints")

    def answers(http: httpx.Client, job_id: str) -> list[tuple[int, Any]]:
        got = [answer(http.get(f"/v1/fine_tuning/jobs/{job_id}{route}")) for route in routes]
        return [*got, answer(http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel"))]

    with as_tenant(gw, b) as http:
        seen_by_b = answers(http, job.id)
        assert job.id not in [j["id"] for j in http.get("/v1/fine_tuning/jobs").json()["data"]]
    with as_tenant(gw, a) as http:  # what A gets for a job that does not exist, with A's id in it
        truly_missing = json.loads(json.dumps(answers(http, missing)).replace(missing, job.id))
    assert seen_by_b == [tuple(x) for x in truly_missing]
    assert all(status == 404 for status, _ in seen_by_b)
    assert client_a.fine_tuning.jobs.retrieve(job.id).status == "queued"  # B's cancel did nothing
    assert [j.id for j in client_a.fine_tuning.jobs.list()] == [job.id]
    with gw.gateway.http() as admin:  # the admin key is the default tenant on the data plane, not a superuser
        assert admin.get(f"/v1/fine_tuning/jobs/{job.id}").status_code == 404


def test_fine_tuned_model_is_named_for_its_tenant_and_usable_at_once(
    gw: Stack, two_tenants: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path
) -> None:
    a, _ = two_tenants
    tenant = a["tenant_id"]
    client = gw.gateway.client(api_key=a["key"])
    file_id = client.files.create(file=("a.jsonl", io.BytesIO(JSONL)), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=file_id, suffix="support")
    assert job.organization_id == tenant
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []
    gw.loop.call(lambda: gw.trainer.run_to_success(job.id, steps=2, checkpoints=True))
    # What the real trainer does on success: publish under the manifest's adapter name, version = job id.
    publish_test_adapter(gw.store, tmp_path / "ft", gw.trainer.jobs[job.id].adapter_name, job.id)

    done = client.fine_tuning.jobs.retrieve(job.id)
    expected = f"ft:smollm2-135m-instruct:{tenant}:support:{job.id.removeprefix('ftjob-')}"
    assert done.status == "succeeded" and done.fine_tuned_model == expected
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].message == f"Adapter {expected} published"  # the tenant's id, not the store name
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [2, 1]
    assert checkpoints[0].fine_tuning_job_id == job.id and checkpoints[0].metrics.step == 2
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{expected}:ckpt-step-2"

    assert expected in [m.id for m in client.models.list()]
    reply = client.chat.completions.create(**chat_body(expected))  # type: ignore[arg-type]
    assert reply.model == expected
    assert gw.all_requests()[-1].adapter == f"{tenant}/{expected}@{job.id}"
