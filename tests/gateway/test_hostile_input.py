"""Hostile input at the gateway: nasty identifiers, tenant-chosen dataset names, hostile uploads and
bodies, prompts over the context. Each answer is a 4xx with the OpenAI error body (never a 5xx), a
victim tenant's adapter, file and job are neither reached nor changed, and the gateway stays healthy.

Paths are sent byte for byte with http.client: httpx would resolve "../" before sending."""

from __future__ import annotations

import gzip
import http.client
import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from grpc_health.v1 import health, health_pb2

from lorafleet_common.store import LocalStore
from lorafleet_trainer.manifest import ManifestError, parse_manifest
from tests.gateway.gateway_fakes import publish_dummy_adapter
from tests.gateway.gateway_harness import (
    ADMIN_KEY,
    BASE_MODEL,
    Gateway,
    LoopThread,
    Stack,
    gateway_settings,
    start_gateway,
    stop_gateway,
)

JSONL = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
CHAT = "/v1/chat/completions"
FT = "/v1/fine_tuning/jobs"
LONG = "x" * 10_000

# Identifiers as they go on the wire (already percent-encoded where a client would have to).
NASTY = [
    "../../etc/passwd",
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%252e%252e%252fetc%252fpasswd",
    "..%5c..%5cetc%5cpasswd",
    "%2Fetc%2Fpasswd",
    "file:%2F%2F%2Fetc%2Fpasswd",
    "s3:%2F%2Florafleet%2Ffiles",
    "a%00b",
    "%E2%80%AEdcba",  # right-to-left override
    "%EF%BC%8E%EF%BC%8E%EF%BC%8Fetc",  # fullwidth "../"
    "%C0%AE%C0%AE%2Fetc",  # overlong UTF-8 "../"
    "%FF%FE",
    LONG,
]


def send(gateway: Gateway, method: str, path: str, key: str, body: Any = None) -> tuple[int, Any]:
    """One request with ``path`` exactly as given; returns the status and the parsed JSON body."""
    url = urlsplit(gateway.url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=15)
    headers = {"Authorization": f"Bearer {key}"}
    payload = None if body is None else json.dumps(body).encode()
    if payload is not None:
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def assert_openai_error(status: int, body: Any, allowed: tuple[int, ...] = (400, 404)) -> dict[str, Any]:
    assert status in allowed, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert len(error["message"]) < 3_000, len(error["message"])  # an echoed 10k id is cut
    return error


def assert_healthy(gw: Stack, key: str) -> None:
    with gw.gateway.http(api_key=key) as http:
        assert http.get("/health").json() == {"status": "ok"}
        ok = http.post(CHAT, json={"model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert ok.status_code == 200, ok.text


def upload(gw: Stack, key: str, data: bytes, name: str = "data.jsonl", **headers: str) -> Any:
    with gw.gateway.http(api_key=key) as http:
        return http.post("/v1/files", files={"file": (name, data)}, data={"purpose": "fine-tune"}, headers=headers)


@pytest.fixture
def victim(gw: Stack, tmp_path: Path) -> dict[str, str]:
    """Another tenant with an adapter, a file and a queued job: what an attacker's ids must never reach."""
    tenant = gw.new_tenant()
    key = gw.new_key(tenant)["key"]
    publish_dummy_adapter(gw.store, f"{tenant}/secret-bot", "v1", base_model=BASE_MODEL)
    file_id = upload(gw, key, JSONL).json()["id"]
    with gw.gateway.http(api_key=key) as http:
        job_id = http.post(FT, json={"model": BASE_MODEL, "training_file": file_id}).json()["id"]
    return {"tenant": tenant, "key": key, "file": file_id, "job": job_id}


@pytest.fixture
def attacker_tenant(gw: Stack) -> str:
    return gw.new_tenant()


@pytest.fixture
def attacker(gw: Stack, attacker_tenant: str) -> str:
    return str(gw.new_key(attacker_tenant)["key"])


def assert_victim_untouched(gw: Stack, victim: dict[str, str]) -> None:
    tenant = victim["tenant"]
    assert gw.store.exists(f"adapters/{tenant}/secret-bot/LATEST")
    assert gw.store.exists(f"files/{tenant}/{victim['file']}")
    assert gw.trainer.jobs[victim["job"]].labels["tenant"] == tenant
    with gw.gateway.http(api_key=victim["key"]) as http:
        assert http.get(f"{FT}/{victim['job']}").json()["status"] == "queued"  # no one cancelled it


def test_nasty_model_ids(gw: Stack, victim: dict[str, str], attacker: str) -> None:
    targets = [*NASTY, f"..%2F{victim['tenant']}%2Fsecret-bot", f"../{victim['tenant']}/secret-bot"]
    targets += [f"{victim['tenant']}%2Fsecret-bot", f"%2F{victim['tenant']}%2Fsecret-bot", "secret-bot"]
    for model in targets:
        for method, path in (
            ("GET", f"/v1/models/{model}"),
            ("DELETE", f"/v1/models/{model}"),
            ("GET", f"/v1/lorafleet/adapters/{model}"),
        ):
            assert_openai_error(*send(gw.gateway, method, path, attacker))
        for body in (
            {"model": model, "messages": [{"role": "user", "content": "hi"}]},
            {"model": model, "prompt": "x"},
        ):
            path = CHAT if "messages" in body else "/v1/completions"
            assert_openai_error(*send(gw.gateway, "POST", path, attacker, body))
    assert gw.all_requests() == []  # nothing reached a replica
    assert_victim_untouched(gw, victim)
    assert_healthy(gw, attacker)


def test_nasty_file_ids(gw: Stack, victim: dict[str, str], attacker: str) -> None:
    targets = [*NASTY, victim["file"], f"..%2F{victim['tenant']}%2F{victim['file']}", f"{victim['file']}%00"]
    for file_id in targets:
        for method, path in (
            ("GET", f"/v1/files/{file_id}"),
            ("GET", f"/v1/files/{file_id}/content"),
            ("DELETE", f"/v1/files/{file_id}"),
        ):
            assert_openai_error(*send(gw.gateway, method, path, attacker))
    assert_victim_untouched(gw, victim)


def test_nasty_job_ids(gw: Stack, victim: dict[str, str], attacker: str) -> None:
    for job_id in [*NASTY, victim["job"], f"..%2F{victim['job']}"]:
        for method, path in (
            ("GET", f"{FT}/{job_id}"),
            ("POST", f"{FT}/{job_id}/cancel"),
            ("GET", f"{FT}/{job_id}/events"),
            ("GET", f"{FT}/{job_id}/events/stream"),
            ("GET", f"{FT}/{job_id}/checkpoints"),
            ("GET", f"{FT}/{victim['job']}/events?after={job_id}"),
        ):
            assert_openai_error(*send(gw.gateway, method, path, attacker))
    # Regression: '²' passes str.isdigit() but not int(): an event id ending in it was a 500.
    status, body = send(gw.gateway, "GET", f"{FT}/{victim['job']}/events?after=ftevent-x-%C2%B2", victim["key"])
    assert assert_openai_error(status, body, (400,))["param"] == "after"
    assert_victim_untouched(gw, victim)


def test_tenant_chosen_dataset_names_cannot_leave_the_tenants_files(
    gw: Stack, victim: dict[str, str], attacker: str
) -> None:
    """training_file, validation_file, lorafleet.datasets and a lorafleet.training "datasets" key: a tenant
    names uploaded file ids only; the manifest the trainer gets holds store keys under files/<tenant>/."""
    own = upload(gw, attacker, JSONL).json()["id"]
    uris = [
        "../../etc/passwd",
        "/etc/passwd",
        "file:///etc/passwd",
        "file://localhost/etc/passwd",
        "s3://lorafleet/files/x",
        f"files/{victim['tenant']}/{victim['file']}",
        f"../{victim['tenant']}/{victim['file']}",
        victim["file"],
        f"{own}/../{victim['file']}",
        f"{own}\x00",
        f"{own}%2f..",
        LONG,
    ]
    sent = len(gw.trainer.create_requests)
    for uri in uris:
        for body in (
            {"training_file": uri},
            {"training_file": own, "validation_file": uri},
            {"training_file": own, "lorafleet": {"datasets": [uri]}},
            {"training_file": own, "lorafleet": {"datasets": [{"file": uri, "samples": 5}]}},
            {"training_file": own, "lorafleet": {"datasets": [f"{uri}#5"]}},
        ):
            assert_openai_error(*send(gw.gateway, "POST", FT, attacker, {"model": BASE_MODEL, **body}), (400,))
    assert len(gw.trainer.create_requests) == sent  # none reached the trainer

    # An extra "datasets" key smuggled through lorafleet.training lands in the manifest's training section,
    # where the trainer's parser refuses it: the datasets stay the ones the gateway wrote.
    smuggle = {"datasets": [{"uri": "file:///etc/passwd"}], "base_model": "/etc"}
    status, job = send(
        gw.gateway,
        "POST",
        FT,
        attacker,
        {"model": BASE_MODEL, "training_file": own, "lorafleet": {"training": smuggle}},
    )
    assert status == 200, job
    manifest_uri = gw.trainer.create_requests[-1].manifest_uri
    manifest = json.loads(gw.store.get(manifest_uri))
    tenant = manifest["labels"]["tenant"]
    assert manifest_uri.startswith(f"manifests/{tenant}/")
    assert [d["uri"] for d in manifest["datasets"]] == [f"files/{tenant}/{own}"]
    assert manifest["base_model"] == BASE_MODEL
    with pytest.raises(ManifestError, match="training.datasets: unknown field"):
        parse_manifest(gw.store.get(manifest_uri), max_lora_rank=64)
    assert_victim_untouched(gw, victim)


@pytest.mark.parametrize("suffix", ["../../x", "a/b", "a:b", "..", "a\x00", "\u202eevil", "s" * 10_000, ""])
def test_nasty_suffixes(gw: Stack, attacker: str, suffix: str) -> None:
    own = upload(gw, attacker, JSONL).json()["id"]
    body = {"model": BASE_MODEL, "training_file": own, "suffix": suffix}
    assert assert_openai_error(*send(gw.gateway, "POST", FT, attacker, body), (400,))["param"] == "suffix"


def test_nasty_admin_identifiers(gw: Stack) -> None:
    for tenant in NASTY:
        for method, path in (("GET", f"/v1/admin/tenants/{tenant}"), ("DELETE", f"/v1/admin/tenants/{tenant}")):
            assert_openai_error(*send(gw.gateway, method, path, ADMIN_KEY))
        for action in ("load", "unload"):
            path = f"/v1/admin/adapters/secret-bot/{action}"
            assert_openai_error(*send(gw.gateway, "POST", path, ADMIN_KEY, {"tenant": tenant}), (400, 404))
            path = f"/v1/admin/adapters/{tenant}/{action}"
            assert_openai_error(*send(gw.gateway, "POST", path, ADMIN_KEY), (400, 404))
    for body in ({"id": "../x", "name": "x"}, {"id": "a\x00", "name": "x"}, {"name": "n" * 10_000}, {"name": "\x00"}):
        assert_openai_error(*send(gw.gateway, "POST", "/v1/admin/tenants", ADMIN_KEY, body), (400,))


def test_hostile_uploads(gw: Stack, attacker: str, attacker_tenant: str) -> None:
    pickle_bytes = b"\x80\x04\x95\x1a\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94."
    zip_buffer = io.BytesIO()
    with zipfile.ZipFile(zip_buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("data.jsonl", b"0" * 5_000_000)
    cases = [
        (pickle_bytes, "adapter_model.safetensors", "not UTF-8 text"),  # a pickle named .safetensors
        (zip_buffer.getvalue(), "data.jsonl", "line 1"),  # a zip bomb-like archive: never unpacked
        (b"[" * 100_000 + b"\n", "deep.jsonl", "nested too deeply"),  # was a 500 (RecursionError)
        (b'{"a":' * 50_000 + b"\n", "deep.jsonl", "nested too deeply"),
        (b'{"a": "\xff"}\n', "latin1.jsonl", "not UTF-8 text"),
        ('{"a": 1}\n'.encode("utf-16"), "utf16.jsonl", "not UTF-8 text"),
        (b'{"a": 1}\n[1, 2]\n', "array.jsonl", "line 2 is not a JSON object"),
        (b"\n \r\n", "blank.jsonl", "no JSONL rows"),
    ]
    with gw.gateway.http(api_key=attacker) as http:
        before = http.get("/v1/files").json()["data"]
    for data, name, needle in cases:
        response = upload(gw, attacker, data, name)
        error = assert_openai_error(response.status_code, response.json(), (400,))
        assert needle in error["message"] and error["param"] == "file", error
    # Content-Encoding is not undone: a gzip bomb is only its compressed bytes (and refused as such).
    bomb = gzip.compress(b"\x00" * 50_000_000)
    response = upload(gw, attacker, bomb, "bomb.jsonl.gz", **{"Content-Encoding": "gzip"})
    assert assert_openai_error(response.status_code, response.json(), (400,))["param"] == "file"
    with gw.gateway.http(api_key=attacker) as http:
        assert http.get("/v1/files").json()["data"] == before  # nothing was stored
    # What is fine: a BOM, CRLF line ends, a path-like filename (kept as a label only; the id is ours).
    created = upload(gw, attacker, b"\xef\xbb\xbf" + JSONL.replace(b"\n", b"\r\n") * 2, "../../etc/passwd")
    assert created.status_code == 200, created.text
    assert created.json()["filename"] == "../../etc/passwd" and created.json()["id"].startswith("file-")
    file_id = created.json()["id"]
    assert gw.store.exists(f"files/{attacker_tenant}/{file_id}")
    assert [k for k in gw.store.list("files") if "passwd" in k] == []
    assert_healthy(gw, attacker)


def test_upload_size_and_line_limits(gw: Stack, extra_gateway: Any, attacker: str) -> None:
    gateway = extra_gateway(gw.targets, max_file_line_bytes=4096)
    with gateway.http(api_key=attacker) as http:

        def post(data: bytes) -> Any:
            return http.post("/v1/files", files={"file": ("d.jsonl", data)}, data={"purpose": "fine-tune"})

        ok_line = b'{"text": "' + b"y" * 4000 + b'"}\n'
        assert post(ok_line * 3).status_code == 200
        long_line = b'{"text": "' + b"y" * 5000 + b'"}'
        for data in (long_line, ok_line + long_line + b"\n" + ok_line, b"z" * 900_000):  # no newline at all
            response = post(data)
            error = assert_openai_error(response.status_code, response.json(), (400,))
            assert "longer than this server's limit of 4096 bytes" in error["message"], error
        too_big = post(ok_line * 300)  # over max_file_bytes (1 MiB in the test settings)
        assert assert_openai_error(too_big.status_code, too_big.json(), (413,))["code"] == "request_too_large"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"model": "m", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "parsing"),
        (b'{"model": "\xff\xfe", "messages": []}', "parsing"),
        (b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "surrogate"),
        (b'{"model": "M", "messages": [{"role": "user", "content": "a\\udc00b"}]}', "messages[0].content"),
        (b'{"model": "M", "messages": [{"role": "user", "content": "hi"}], "x": {"\\ud83d": 1}}', "surrogate"),
        (b'{"model": "M", "messages": [{"role": "user", "content": "hi"}], "seed": 1180591620717411303424}', "seed"),
        (b'{"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4294967296}', "max_tokens"),
        (b'{"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e999}', "max_tokens"),
        (b'{"model": "M", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
        (b'{"model": "M", "messages": [{"role": "user", "content": "hi"}], "n": ' + b"9" * 5_000 + b"}", "parsing"),
    ],
    ids=[
        "deep",
        "invalid-utf8",
        "surrogate-model",
        "surrogate-content",
        "surrogate-key",
        "seed-over-int64",
        "max-tokens-over-uint32",
        "max-tokens-inf",
        "nan",
        "5000-digit-n",
    ],
)
def test_hostile_json_bodies(gw: Stack, attacker: str, body: bytes, needle: str) -> None:
    """Regressions: lone surrogates (protobuf and the error renderer could not encode them) and numbers
    over the proto's widths were 500s or dropped connections."""
    body = body.replace(b'"M"', json.dumps(BASE_MODEL).encode())
    with gw.gateway.http(api_key=attacker) as http:
        response = http.post(CHAT, content=body, headers={"Content-Type": "application/json"})
    error = assert_openai_error(response.status_code, response.json(), (400,))
    assert needle in error["message"] or needle == error["param"], error
    response.json()  # the error itself is valid UTF-8 JSON
    assert_healthy(gw, attacker)


# ----- the context limit, from the real inference service ------------------------------------------


@pytest.fixture(scope="module")
def context_stack(tmp_path_factory: pytest.TempPathFactory, embedded_model_path: Path) -> Iterator[Gateway]:
    """The real inference gRPC service (real tokenizer, context 64 tokens; no engine: the prompt is checked
    before one is needed) behind a gateway."""
    from lorafleet_inference.adapters import AdapterManager
    from lorafleet_inference.grpc_server import InferenceServicer, build_server
    from lorafleet_inference.prompts import PromptRenderer
    from lorafleet_inference.service import InferenceService
    from tests.inference.inference_helpers import FakeEngine

    root = tmp_path_factory.mktemp("context")
    store = LocalStore(root / "store")
    engine = FakeEngine()
    adapters = AdapterManager(store, engine, cache_dir=root / "cache", base_model=BASE_MODEL, max_rank=8, capacity=2)
    renderer = PromptRenderer.from_pretrained(str(embedded_model_path))
    service = InferenceService(
        engine, adapters, renderer, served_model=BASE_MODEL, max_model_len=64, max_lora_rank=8, max_choices=4
    )
    loop = LoopThread()
    health_servicer = health.aio.HealthServicer()

    async def serve() -> Any:
        server, port = build_server(InferenceServicer(service), health_servicer, "127.0.0.1", 0)
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        return server, port

    server, port = loop.run(serve())
    settings = gateway_settings(root / "store", [f"127.0.0.1:{port}"], "127.0.0.1:1")
    gateway = loop.run(start_gateway(settings, store))
    try:
        yield gateway
    finally:
        loop.run(stop_gateway(gateway))
        loop.run(server.stop(None))
        loop.stop()


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "word " * 200}]},
        {"prompt": "word " * 200},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1_000},
        {"prompt": "hi", "max_tokens": 1_000},
    ],
    ids=["chat-prompt", "completion-prompt", "chat-max-tokens", "completion-max-tokens"],
)
def test_over_the_context_is_a_clear_400(context_stack: Gateway, body: dict[str, Any]) -> None:
    """Before: inference said INVALID_ARGUMENT and the client got a 400 with no code; now OUT_OF_RANGE
    becomes OpenAI's context_length_exceeded, with the engine's token counts in the message."""
    path = CHAT if "messages" in body else "/v1/completions"
    for stream in (False, True):
        with context_stack.http() as http:
            response = http.post(path, json={"model": BASE_MODEL, "stream": stream, **body})
        error = assert_openai_error(response.status_code, response.json(), (400,))
        assert error["code"] == "context_length_exceeded", error
        assert "context" in error["message"] and "64 tokens" in error["message"], error
