"""Property-based fuzzing of the gateway's HTTP API from its own OpenAPI document (schemathesis).

Every operation gets generated requests, valid and invalid (wrong types, missing fields, odd
strings, unknown parameters), against the real app on a loopback port, in front of fake upstreams
(a scripted inference replica and trainer: real gRPC servers). Tenant routes use a tenant's key,
admin routes and /metrics the admin key. Each response must be: no 5xx; every 4xx the OpenAI error object; the
status, content type, headers and body as the document declares (schemathesis' conformance checks,
which also send each operation without a key and with unsupported methods).

Two schemathesis checks are left out on purpose: "schema-valid request rejected" and "schema-
violating request accepted". JSON Schema cannot say what the gateway checks beyond it (cross-field
rules such as top_logprobs needing logprobs, an unknown model, a disabled tenant), and the gateway
accepts unknown parameters as OpenAI does. Examples are bounded per operation and derandomized,
so a CI run replays exactly the same requests; hypothesis deadlines are off on this shared machine,
every request has a timeout instead. The stack is this module's own, so the fuzzer's tenants, keys
and deletes touch no other test.
"""

from __future__ import annotations

import tempfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from prometheus_client import CollectorRegistry
from schemathesis.checks import load_all_checks
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from lorafleet_common.store import LocalStore
from lorafleet_gateway.app import create_app
from lorafleet_gateway.deps import GatewayDeps
from tests.gateway.gateway_fakes import (
    FakeInference,
    FakeTrainer,
    publish_dummy_adapter,
    serve_inference,
    serve_trainer,
)
from tests.gateway.gateway_harness import (
    ADMIN_KEY,
    BASE_MODEL,
    Gateway,
    LoopThread,
    gateway_settings,
    start_gateway,
    stop_gateway,
)

MAX_EXAMPLES = 25  # per operation; 33 operations
REQUEST_TIMEOUT_S = 15
TRAINING_JSONL = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'

load_all_checks()


def _gateway_openapi() -> dict[str, Any]:
    """The document the gateway serves at /openapi.json (building the app starts nothing: no lifespan)."""
    with tempfile.TemporaryDirectory(prefix="lorafleet-openapi-") as tmp:
        store_root = Path(tmp) / "store"
        settings_ = gateway_settings(store_root, ["127.0.0.1:1"], "127.0.0.1:2")
        app = create_app(settings_, GatewayDeps(store=LocalStore(store_root), registry=CollectorRegistry()))
        document: dict[str, Any] = app.openapi()
        return document


schema = schemathesis.openapi.from_dict(_gateway_openapi())


@dataclass
class FuzzStack:
    gateway: Gateway
    tenant_key: str
    file_id: str
    model: str
    seen: Counter[str] = field(default_factory=Counter)


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzStack]:
    root = tmp_path_factory.mktemp("openapi-fuzz")
    store = LocalStore(root / "store")
    loop = LoopThread()
    replica = FakeInference("a")
    trainer = FakeTrainer(store)
    servers = [loop.run(serve_inference(replica)), loop.run(serve_trainer(trainer))]
    settings_ = gateway_settings(root / "store", [f"127.0.0.1:{replica.port}"], f"127.0.0.1:{trainer.port}")
    gateway = loop.run(start_gateway(settings_, store))
    tenant = gateway.new_tenant()
    key = gateway.new_key(tenant)["key"]
    publish_dummy_adapter(store, f"{tenant}/fuzz-bot", "v1", base_model=BASE_MODEL)
    with gateway.http(api_key=key) as http:
        uploaded = http.post("/v1/files", files={"file": ("t.jsonl", TRAINING_JSONL)}, data={"purpose": "fine-tune"})
    stack = FuzzStack(gateway, key, uploaded.json()["id"], "fuzz-bot")
    try:
        yield stack
    finally:
        # The figures docs/reliability.md quotes (shown with -s).
        print(f"\nopenapi fuzz: {sum(stack.seen.values())} requests by status: {dict(sorted(stack.seen.items()))}")
        loop.run(stop_gateway(gateway))
        for server in servers:
            loop.run(server.stop(None))
        loop.stop()


def _steer(case: Any, stack: FuzzStack) -> None:
    """Point half of the generated bodies at things that exist, so the fuzzer gets past "model not found"
    into generation and job creation. Chosen by a checksum of the body: the same on every run."""
    body = case.body
    if not isinstance(body, dict) or zlib.crc32(repr(sorted(map(str, body))).encode()) % 2:
        return
    if case.path in ("/v1/chat/completions", "/v1/completions"):
        body["model"] = stack.model if zlib.crc32(repr(body).encode()) % 2 else BASE_MODEL
    elif case.path == "/v1/fine_tuning/jobs":
        body.update(model=BASE_MODEL, training_file=stack.file_id)


def assert_openai_error_body(response: Any) -> None:
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, response.text[:500]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), error


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
@pytest.mark.timeout(300)  # a hang guard per operation, far above what it needs
def test_every_operation_answers_within_its_contract(case: Any, fuzz_stack: FuzzStack) -> None:
    key = ADMIN_KEY if case.path.startswith("/v1/admin/") or case.path == "/metrics" else fuzz_stack.tenant_key
    headers = {"Authorization": f"Bearer {key}"}
    _steer(case, fuzz_stack)
    response = case.call(base_url=fuzz_stack.gateway.url, headers=headers, timeout=REQUEST_TIMEOUT_S)
    fuzz_stack.seen[str(response.status_code)] += 1
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert_openai_error_body(response)
    case.validate_response(
        response,
        headers=headers,
        excluded_checks=[positive_data_acceptance, negative_data_rejection],
        transport_kwargs={"base_url": fuzz_stack.gateway.url, "headers": headers, "timeout": REQUEST_TIMEOUT_S},
    )
