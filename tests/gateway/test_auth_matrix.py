"""Every route of the gateway against every kind of caller: no key, malformed keys, a revoked key, a disabled
tenant's key, another tenant's key on tenant A's objects, tenant A itself, and the admin key.

The routes come from the app itself (``app.routes``): a route missing from ROUTES below fails
``test_every_route_is_in_the_matrix``, so a new endpoint cannot ship without its access rule being
stated and tested here. Real gateway on loopback, fake replicas and trainer (tests/gateway/conftest.py).

Expected:
* no key, a malformed key, a revoked key, a disabled tenant's key: 401 with OpenAI's error body
  (revoked and disabled keys answer exactly what a key that never existed answers);
* admin routes: 403 ``permission_denied`` for tenant keys, success for the admin key;
* tenant routes naming one of A's objects (in the path or the body): B gets exactly what it gets for
  a missing object (status and body, ids aside), and so does the admin key (the default tenant, not a
  superuser); A itself succeeds, which proves the object was there; listings never show A's ids to B;
* public routes (health, docs, console pages, static files): the same answer whoever asks.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import httpx
import pytest
from fastapi.routing import APIRoute
from starlette.routing import Mount, Route

from tests.gateway.gateway_harness import ADMIN_KEY, BASE_MODEL, Stack, publish_test_adapter
from tests.gateway.test_files_fine_tuning import JSONL

Access = Literal["public", "tenant", "admin"]
Request = tuple[str, str, dict[str, Any]]  # method, path, httpx keyword arguments


@dataclass(frozen=True)
class Ids:
    """The objects one request names: tenant A's (real) or MISSING (ids of the same shape that exist nowhere)."""

    tenant: str
    model: str
    file: str
    job: str
    key: str


MISSING = Ids(
    tenant="no-such-tenant",
    model="no-such-model",
    file="file-" + "0" * 24,
    job="ftjob-000000000000",
    key="key_" + "0" * 16,
)


@dataclass(frozen=True)
class Case:
    access: Access
    request: Callable[[Ids], Request]
    # Tenant routes: whether the request names one of A's objects (then B must see it as missing);
    # otherwise it is a listing or a create, and ``listed`` says which of A's ids must not appear for B.
    names_object: bool = False
    listed: Callable[[Ids], str] | None = None
    # What A (the owner), or for admin routes the admin key, gets.
    ok: int = 200
    # Destructive requests get objects of their own (see World.fresh) instead of the shared ones.
    fresh: tuple[str, ...] = ()
    # Public routes: whether the admin key is shown more than everyone else (then tested on its own).
    admin_sees_more: bool = False


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def job_route(suffix: str = "", method: str = "GET", **case: Any) -> Case:
    return Case("tenant", lambda i: (method, f"/v1/fine_tuning/jobs/{i.job}{suffix}", {}), names_object=True, **case)


def public(path: str, ok: int = 200) -> Case:
    return Case("public", lambda i: ("GET", path, {}), ok=ok)


def upload() -> dict[str, Any]:
    return {"files": {"file": ("train.jsonl", JSONL)}, "data": {"purpose": "fine-tune"}}


ROUTES: dict[tuple[str, str], Case] = {
    # -- data plane: OpenAI-compatible ----------------------------------------------------------------
    ("POST", "/v1/chat/completions"): Case(
        "tenant", lambda i: ("POST", "/v1/chat/completions", {"json": chat(i.model)}), names_object=True
    ),
    ("POST", "/v1/completions"): Case(
        "tenant",
        lambda i: ("POST", "/v1/completions", {"json": {"model": i.model, "prompt": "hi", "max_tokens": 3}}),
        names_object=True,
    ),
    ("GET", "/v1/models"): Case("tenant", lambda i: ("GET", "/v1/models", {}), listed=lambda i: i.model),
    ("GET", "/v1/models/{model_id:path}"): Case(
        "tenant", lambda i: ("GET", f"/v1/models/{i.model}", {}), names_object=True
    ),
    ("DELETE", "/v1/models/{model_id:path}"): Case(
        "tenant", lambda i: ("DELETE", f"/v1/models/{i.model}", {}), names_object=True, fresh=("model",)
    ),
    ("POST", "/v1/files"): Case("tenant", lambda i: ("POST", "/v1/files", upload())),
    ("GET", "/v1/files"): Case("tenant", lambda i: ("GET", "/v1/files", {}), listed=lambda i: i.file),
    ("GET", "/v1/files/{file_id}"): Case("tenant", lambda i: ("GET", f"/v1/files/{i.file}", {}), names_object=True),
    ("GET", "/v1/files/{file_id}/content"): Case(
        "tenant", lambda i: ("GET", f"/v1/files/{i.file}/content", {}), names_object=True
    ),
    ("DELETE", "/v1/files/{file_id}"): Case(
        "tenant", lambda i: ("DELETE", f"/v1/files/{i.file}", {}), names_object=True, fresh=("file",)
    ),
    # Naming A's file as training data: B gets the 400 a missing file gets, A gets its job.
    ("POST", "/v1/fine_tuning/jobs"): Case(
        "tenant",
        lambda i: ("POST", "/v1/fine_tuning/jobs", {"json": {"model": BASE_MODEL, "training_file": i.file}}),
        names_object=True,
    ),
    ("GET", "/v1/fine_tuning/jobs"): Case(
        "tenant", lambda i: ("GET", "/v1/fine_tuning/jobs", {}), listed=lambda i: i.job
    ),
    ("GET", "/v1/fine_tuning/jobs/{job_id}"): job_route(),
    ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel"): job_route("/cancel", "POST", fresh=("job",)),
    ("GET", "/v1/fine_tuning/jobs/{job_id}/events"): job_route("/events"),
    ("GET", "/v1/fine_tuning/jobs/{job_id}/events/stream"): job_route("/events/stream"),
    ("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints"): job_route("/checkpoints"),
    # -- data plane: LoRA Fleet extensions --------------------------------------------------------------
    ("GET", "/v1/lorafleet/adapters"): Case(
        "tenant", lambda i: ("GET", "/v1/lorafleet/adapters", {}), listed=lambda i: i.model
    ),
    ("GET", "/v1/lorafleet/adapters/{model_id:path}"): Case(
        "tenant", lambda i: ("GET", f"/v1/lorafleet/adapters/{i.model}", {}), names_object=True
    ),
    # -- admin API ------------------------------------------------------------------------------------
    ("POST", "/v1/admin/tenants"): Case(
        "admin", lambda i: ("POST", "/v1/admin/tenants", {"json": {"name": f"New {uuid.uuid4().hex[:8]}"}}), ok=201
    ),
    ("GET", "/v1/admin/tenants"): Case("admin", lambda i: ("GET", "/v1/admin/tenants", {})),
    ("GET", "/v1/admin/tenants/{tenant_id}"): Case("admin", lambda i: ("GET", f"/v1/admin/tenants/{i.tenant}", {})),
    ("PATCH", "/v1/admin/tenants/{tenant_id}"): Case(
        "admin", lambda i: ("PATCH", f"/v1/admin/tenants/{i.tenant}", {"json": {"name": "Renamed"}}), fresh=("tenant",)
    ),
    ("DELETE", "/v1/admin/tenants/{tenant_id}"): Case(
        "admin", lambda i: ("DELETE", f"/v1/admin/tenants/{i.tenant}", {}), fresh=("tenant",)
    ),
    ("POST", "/v1/admin/tenants/{tenant_id}/keys"): Case(
        "admin", lambda i: ("POST", f"/v1/admin/tenants/{i.tenant}/keys", {"json": {}}), ok=201, fresh=("tenant",)
    ),
    ("GET", "/v1/admin/tenants/{tenant_id}/keys"): Case(
        "admin", lambda i: ("GET", f"/v1/admin/tenants/{i.tenant}/keys", {})
    ),
    ("PATCH", "/v1/admin/keys/{key_id}"): Case(
        "admin", lambda i: ("PATCH", f"/v1/admin/keys/{i.key}", {"json": {"rpm_limit": 100}}), fresh=("key",)
    ),
    ("DELETE", "/v1/admin/keys/{key_id}"): Case(
        "admin", lambda i: ("DELETE", f"/v1/admin/keys/{i.key}", {}), fresh=("key",)
    ),
    ("POST", "/v1/admin/adapters/{model_id:path}/load"): Case(
        "admin", lambda i: ("POST", f"/v1/admin/adapters/{i.model}/load", {"json": {"tenant": i.tenant}})
    ),
    ("POST", "/v1/admin/adapters/{model_id:path}/unload"): Case(
        "admin", lambda i: ("POST", f"/v1/admin/adapters/{i.model}/unload", {"json": {"tenant": i.tenant}})
    ),
    # -- operations -----------------------------------------------------------------------------------
    ("GET", "/health"): public("/health"),
    # Replica addresses for the admin only: test_ready_shows_replica_addresses_to_the_admin_only.
    ("GET", "/ready"): Case("public", lambda i: ("GET", "/ready", {}), admin_sees_more=True),
    # Its labels name every tenant and the adapters they used.
    ("GET", "/metrics"): Case("admin", lambda i: ("GET", "/metrics", {})),
    # -- documentation and the console (pages without data; the browser calls /v1 with the key) ---------
    ("GET", "/openapi.json"): public("/openapi.json"),
    ("GET", "/docs"): public("/docs"),
    ("GET", "/docs/oauth2-redirect"): public("/docs/oauth2-redirect"),
    ("GET", "/redoc"): public("/redoc"),
    ("GET", "/"): public("/", ok=307),
    ("GET", "/console"): public("/console", ok=307),
    ("GET", "/console/login"): public("/console/login"),
    ("GET", "/console/jobs"): public("/console/jobs"),
    ("GET", "/console/jobs/{job_id}"): Case("public", lambda i: ("GET", f"/console/jobs/{i.job}", {})),
    ("GET", "/console/adapters"): public("/console/adapters"),
    ("GET", "/console/playground"): public("/console/playground"),
    ("GET", "/console/static/{path}"): public("/console/static/console.js"),
}


def app_routes(app: Any) -> set[tuple[str, str]]:
    """(method, path template) of everything the app serves; HEAD rides along with GET."""
    found = set()
    for route in app.routes:
        if isinstance(route, APIRoute | Route):
            found |= {(method, route.path) for method in route.methods or () if method != "HEAD"}
        elif isinstance(route, Mount):
            found.add(("GET", f"{route.path}/{{path}}"))
        else:
            found.add(("?", repr(route)))
    return found


@dataclass
class World:
    """Tenant A with one of each object; tenant B; keys in every state."""

    gw: Stack
    a: dict[str, Any]  # A's key object (with its secret)
    b: dict[str, Any]
    revoked: dict[str, Any]  # a key of A's, revoked
    disabled: dict[str, Any]  # the key of a tenant that was disabled
    ids: Ids  # A's objects: a published adapter, an uploaded file, a succeeded job with checkpoints

    http: httpx.Client  # one connection pool for the whole matrix; each request carries its own header

    def send(self, authorization: str | None, request: Request) -> httpx.Response:
        method, path, kwargs = request
        headers = {"Authorization": authorization} if authorization is not None else {}
        return self.http.request(method, path, headers=headers, **kwargs)

    def fresh(self, what: tuple[str, ...]) -> Ids:
        """A's shared objects, with the named ones replaced by new ones (for requests that destroy them)."""
        ids = self.ids
        owner = bearer(self.a)
        for kind in what:
            if kind == "model":
                name = f"doomed-{uuid.uuid4().hex[:8]}"
                publish_test_adapter(
                    self.gw.store, self.gw.store.root.parent / "adapters" / name, f"{ids.tenant}/{name}", "v1"
                )
                ids = replace(ids, model=name)
            elif kind == "file":
                ids = replace(ids, file=self.send(owner, ("POST", "/v1/files", upload())).json()["id"])
            elif kind == "job":
                body = {"model": BASE_MODEL, "training_file": ids.file}
                ids = replace(ids, job=self.send(owner, ("POST", "/v1/fine_tuning/jobs", {"json": body})).json()["id"])
            elif kind == "tenant":
                ids = replace(ids, tenant=self.gw.new_tenant())
            elif kind == "key":
                ids = replace(ids, key=self.gw.new_key(ids.tenant)["id"])
        return ids


def bearer(key: dict[str, Any]) -> str:
    return f"Bearer {key['key']}"


@pytest.fixture(scope="module")
def world(stack: Stack) -> Iterator[World]:
    gw = stack
    a_tenant, b_tenant, c_tenant = gw.new_tenant(), gw.new_tenant(), gw.new_tenant()
    a, b, revoked, disabled = gw.new_key(a_tenant), gw.new_key(b_tenant), gw.new_key(a_tenant), gw.new_key(c_tenant)
    with gw.gateway.http() as admin:
        assert admin.delete(f"/v1/admin/keys/{revoked['id']}").status_code == 200
        assert admin.delete(f"/v1/admin/tenants/{c_tenant}").status_code == 200
    model = "private-bot"
    publish_test_adapter(gw.store, gw.store.root.parent / "adapters" / a_tenant, f"{a_tenant}/{model}", "v1")
    with gw.gateway.http(api_key=a["key"]) as http:
        file_id = http.post("/v1/files", **upload()).json()["id"]
        created = http.post("/v1/fine_tuning/jobs", json={"model": BASE_MODEL, "training_file": file_id})
    job_id = created.json()["id"]
    gw.loop.call(lambda: gw.trainer.run_to_success(job_id, steps=2, checkpoints=True))  # events and checkpoints
    ids = Ids(tenant=a_tenant, model=model, file=file_id, job=job_id, key=a["id"])
    with httpx.Client(base_url=gw.gateway.url, timeout=15) as http:
        yield World(gw, a, b, revoked, disabled, ids, http)


def malformed(world: World) -> dict[str, str]:
    key = world.a["key"]
    return {
        "wrong scheme": f"Basic {key}",
        "scheme only": "Bearer",
        "truncated key": f"Bearer {key[:-1]}",
        "key with junk after it": f"Bearer {key} x",
        "unknown lf- key": "Bearer lf-" + "A" * 43,
        "admin key with a different case": f"Bearer {ADMIN_KEY.upper()}",
    }


def is_unauthenticated(response: httpx.Response) -> bool:
    body = response.json()
    return (
        response.status_code == 401
        and response.headers.get("www-authenticate") == "Bearer"
        and set(body) == {"error"}
        and set(body["error"]) == {"message", "type", "param", "code"}
        and body["error"]["type"] == "invalid_request_error"
        and body["error"]["code"] == "invalid_api_key"
        and body["error"]["param"] is None
    )


def answer(response: httpx.Response) -> tuple[int, str]:
    """Status and body; SSE and file bodies as text, so any response compares."""
    return response.status_code, response.text


def as_if_named(seen: tuple[int, str], missing: Ids, real: Ids) -> tuple[int, str]:
    """An answer about MISSING objects, rewritten to name the real ones (what an indistinguishable answer is)."""
    status, text = seen
    for field in ("model", "file", "job", "tenant", "key"):
        text = text.replace(getattr(missing, field), getattr(real, field))
    return status, text


def test_every_route_is_in_the_matrix(gw: Stack) -> None:
    served = app_routes(gw.gateway.app)
    assert served - set(ROUTES) == set(), "new routes: add them to ROUTES with their access rule"
    assert set(ROUTES) - served == set(), "ROUTES lists routes the app no longer serves"


@pytest.mark.parametrize("route", list(ROUTES), ids=[f"{m} {p}" for m, p in ROUTES])
def test_route_answers_each_caller_as_it_should(gw: Stack, world: World, route: tuple[str, str]) -> None:
    case = ROUTES[route]
    ids = world.fresh(case.fresh)
    request = case.request(ids)
    admin = f"Bearer {ADMIN_KEY}"

    if case.access == "public":
        anonymous = world.send(None, request)
        assert anonymous.status_code == case.ok, anonymous.text
        callers = [bearer(world.b), bearer(world.a), "Basic nonsense"] + ([] if case.admin_sees_more else [admin])
        for caller in callers:
            assert answer(world.send(caller, request)) == answer(anonymous), caller
        return

    # Nobody without a valid key gets past authentication, whatever the route and its object.
    rejected = {"no key": world.send(None, request)}
    rejected |= {name: world.send(value, request) for name, value in malformed(world).items()}
    rejected |= {kind: world.send(bearer(getattr(world, kind)), request) for kind in ("revoked", "disabled")}
    assert {name: is_unauthenticated(r) for name, r in rejected.items()} == dict.fromkeys(rejected, True)
    # A revoked key, or a disabled tenant's, answers exactly as a key that never existed.
    never_existed = answer(rejected["unknown lf- key"])
    assert answer(rejected["revoked"]) == never_existed and answer(rejected["disabled"]) == never_existed

    if case.access == "admin":
        for tenant_key in (world.a, world.b):
            denied = world.send(bearer(tenant_key), request)
            assert denied.status_code == 403
            assert denied.json() == {
                "error": {
                    "message": "This endpoint needs the admin API key.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "permission_denied",
                }
            }
        allowed = world.send(admin, request)
        assert allowed.status_code == case.ok, allowed.text
        return

    if case.names_object:
        # B, and the admin key (the default tenant), see A's object exactly as a missing one.
        for caller in (bearer(world.b), admin):
            seen = answer(world.send(caller, request))
            missing = as_if_named(answer(world.send(caller, case.request(MISSING))), MISSING, ids)
            assert seen == missing, caller
            assert seen[0] in (400, 404), seen
    elif case.listed is not None:
        hidden = case.listed(ids)
        assert hidden not in world.send(bearer(world.b), request).text
        assert hidden in world.send(bearer(world.a), request).text
    owner = world.send(bearer(world.a), request)  # last: it may delete the object
    assert owner.status_code == case.ok, owner.text


def test_ready_shows_replica_addresses_to_the_admin_only(gw: Stack, world: World) -> None:
    request: Request = ("GET", "/ready", {})
    admin = world.send(f"Bearer {ADMIN_KEY}", request).json()
    assert set(admin["replicas"]) == set(gw.targets)
    for caller in (None, bearer(world.a), bearer(world.revoked)):
        body = world.send(caller, request).json()
        assert body["status"] == "ready" and len(body["replicas"]) == len(gw.targets)
        assert not any(target in json.dumps(body) for target in gw.targets)
        assert not any(target.split(":")[1] in json.dumps(body) for target in gw.targets)  # not even the ports


def test_metrics_do_not_leak_tenant_names_to_other_tenants(gw: Stack, world: World) -> None:
    """The label values /metrics holds (tenant ids, their adapter names) are for the operator alone."""
    with gw.gateway.http(api_key=world.a["key"]) as http:
        assert http.post("/v1/chat/completions", json=chat(world.ids.model)).status_code == 200
    scraped = world.send(f"Bearer {ADMIN_KEY}", ("GET", "/metrics", {})).text
    assert f'tenant="{world.ids.tenant}"' in scraped and f"{world.ids.tenant}/{world.ids.model}" in scraped
    for caller in (None, bearer(world.b)):
        assert world.ids.tenant not in world.send(caller, ("GET", "/metrics", {})).text


def test_uploads_land_in_the_callers_namespace(gw: Stack, world: World) -> None:
    """A create names no foreign object, but what B creates must be B's: invisible to A."""
    with gw.gateway.http(api_key=world.b["key"]) as http:
        file_id = http.post("/v1/files", **upload()).json()["id"]
    assert gw.store.exists(f"files/{world.b['tenant_id']}/{file_id}")
    with gw.gateway.http(api_key=world.a["key"]) as http:
        assert http.get(f"/v1/files/{file_id}").status_code == 404
        assert file_id not in http.get("/v1/files").text


def test_upload_body_is_what_it_claims(gw: Stack, world: World) -> None:
    """The owner's download returns the bytes it uploaded (so the matrix's 200 is the real file)."""
    with gw.gateway.http(api_key=world.a["key"]) as http:
        assert http.get(f"/v1/files/{world.ids.file}/content").content == io.BytesIO(JSONL).getvalue()
