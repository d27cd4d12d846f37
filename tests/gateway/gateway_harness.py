"""The gateway under test: the real app served by uvicorn on a loopback port, in front of fake upstreams
that are real grpc.aio servers. Everything server-side runs on one event loop in a background thread,
so tests are plain sync functions driving the official openai client (and httpx for raw checks)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import openai
import uvicorn
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry

from lorafleet_common.store import LocalStore
from lorafleet_gateway.app import create_app
from lorafleet_gateway.deps import GatewayDeps
from lorafleet_gateway.settings import GatewaySettings
from tests.gateway.gateway_fakes import FakeInference, FakeTrainer, publish_dummy_adapter

T = TypeVar("T")

ADMIN_KEY = "test-admin-key-0123456789"
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
ADAPTER = "self-cognition"
ADAPTER_VERSION = "v1"


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class LoopThread:
    """An asyncio loop in a daemon thread; run() executes a coroutine there and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="gateway-test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


@dataclass
class Gateway:
    """A running gateway: its URL, app and uvicorn server."""

    url: str
    app: Any
    server: uvicorn.Server
    task: asyncio.Task[None]
    registry: CollectorRegistry

    def client(self, api_key: str = ADMIN_KEY, **kwargs: Any) -> openai.OpenAI:
        # No client retries: a test must see the gateway's first answer.
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=15, **kwargs)

    def http(self, authorized: bool = True, api_key: str = ADMIN_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if authorized else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=15)

    def new_tenant(self, tenant_id: str | None = None, **limits: Any) -> str:
        """Create a tenant through the admin API (a fresh id unless given); returns its id."""
        tenant_id = tenant_id or f"t-{uuid.uuid4().hex[:10]}"
        with self.http() as http:
            response = http.post("/v1/admin/tenants", json={"id": tenant_id, "name": f"Tenant {tenant_id}", **limits})
        assert response.status_code == 201, response.text
        return tenant_id

    def new_key(self, tenant_id: str, **limits: Any) -> dict[str, Any]:
        """Create an API key through the admin API; returns the created key object (with its secret)."""
        with self.http() as http:
            response = http.post(f"/v1/admin/tenants/{tenant_id}/keys", json=limits)
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created


async def start_gateway(settings: GatewaySettings, store: LocalStore) -> Gateway:
    registry = CollectorRegistry()
    app = create_app(settings, GatewayDeps(store=store, registry=registry))
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    if not server.started:
        raise RuntimeError("gateway did not start")
    port = server.servers[0].sockets[0].getsockname()[1]
    return Gateway(url=f"http://127.0.0.1:{port}", app=app, server=server, task=task, registry=registry)


async def stop_gateway(gateway: Gateway) -> None:
    gateway.server.should_exit = True
    await asyncio.wait_for(gateway.task, 15)


def gateway_settings(store_root: Path, inference: list[str], trainer: str, **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "admin_key": ADMIN_KEY,
        "home": store_root.parent,
        "store_url": store_root.as_uri(),
        "base_model": BASE_MODEL,
        "inference_targets": inference,
        "trainer_target": trainer,
        "connect_timeout_s": 1.0,
        "first_token_timeout_s": 5.0,
        "request_timeout_s": 20.0,
        "health_interval_s": 0.2,
        "max_body_bytes": 256 * 1024,
        "max_file_bytes": 1024 * 1024,
        "max_prompt_chars": 100_000,
    }
    values.update(overrides)
    return GatewaySettings(**values)


def publish_test_adapter(store: LocalStore, folder: Path, name: str, version: str) -> None:
    """A dummy adapter of the test base model, with a fixed creation time and no system prompt."""
    publish_dummy_adapter(
        store, name, version, base_model=BASE_MODEL, folder=folder, created_at=1_700_000_000, system_prompt=None
    )


@dataclass
class Stack:
    loop: LoopThread
    store: LocalStore
    replicas: list[FakeInference]
    trainer: FakeTrainer
    gateway: Gateway
    servers: list[grpc.aio.Server] = field(default_factory=list)

    @property
    def targets(self) -> list[str]:
        return [f"127.0.0.1:{r.port}" for r in self.replicas]

    @property
    def trainer_target(self) -> str:
        return f"127.0.0.1:{self.trainer.port}"

    def new_tenant(self, tenant_id: str | None = None, **limits: Any) -> str:
        return self.gateway.new_tenant(tenant_id, **limits)

    def new_key(self, tenant_id: str, **limits: Any) -> dict[str, Any]:
        return self.gateway.new_key(tenant_id, **limits)

    def all_requests(self) -> list[Any]:
        """Generate requests of every replica, in arrival order."""
        return list(self.replicas[0].journal)

    def reset(self) -> None:
        async def reset_fakes() -> None:
            for replica in self.replicas:
                replica.reset()
                await replica.health.set("", health_pb2.HealthCheckResponse.SERVING)

        self.loop.run(reset_fakes())
        # Failures in the previous test may have ejected replicas: re-check now, not in 0.2 s.
        self.loop.run(self.gateway.app.state.services.pool.check_health())
