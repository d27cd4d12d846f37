"""Fixtures: one shared stack (fake replicas a and b, fake trainer, gateway) per session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from lorafleet_common.store import LocalStore
from tests.gateway.gateway_fakes import FakeInference, FakeTrainer, serve_inference, serve_trainer
from tests.gateway.gateway_harness import (
    ADAPTER,
    ADAPTER_VERSION,
    Gateway,
    LoopThread,
    Stack,
    gateway_settings,
    publish_test_adapter,
    start_gateway,
    stop_gateway,
)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("gateway")
    store = LocalStore(root / "store")
    publish_test_adapter(store, root / "adapter", ADAPTER, ADAPTER_VERSION)
    loop = LoopThread()
    journal: list = []
    replicas = [FakeInference("a", journal=journal), FakeInference("b", journal=journal)]
    trainer = FakeTrainer(store)
    servers = [loop.run(serve_inference(r)) for r in replicas] + [loop.run(serve_trainer(trainer))]
    settings = gateway_settings(root / "store", [f"127.0.0.1:{r.port}" for r in replicas], f"127.0.0.1:{trainer.port}")
    gateway = loop.run(start_gateway(settings, store))
    stack = Stack(loop, store, replicas, trainer, gateway, servers)
    try:
        yield stack
    finally:
        loop.run(stop_gateway(gateway))
        for server in servers:
            loop.run(server.stop(None))
        loop.stop()


@pytest.fixture
def gw(stack: Stack) -> Stack:
    """The shared stack, with fakes reset and every replica healthy."""
    stack.reset()
    return stack


@pytest.fixture
def client(gw: Stack) -> openai.OpenAI:
    return gw.gateway.client()


@pytest.fixture
def extra_gateway(gw: Stack) -> Iterator[Callable[..., Gateway]]:
    """Start more gateways on the stack's loop (other targets or settings); stopped after the test."""
    started: list[Gateway] = []

    def start(targets: list[str], **overrides: Any) -> Gateway:
        settings = gateway_settings(gw.store.root, targets, gw.trainer_target, **overrides)
        gateway = gw.loop.run(start_gateway(settings, gw.store))
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gw.loop.run(stop_gateway(gateway))
