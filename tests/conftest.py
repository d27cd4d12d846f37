"""Fixtures shared by every suite: free loopback ports, the embedded model, a
real S3 HTTP server (moto) on loopback."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lorafleet_common.store import S3Config

pytest_plugins = ["tests.postgres"]  # the postgres_server fixture

REPO_ROOT = Path(__file__).resolve().parents[1]
# Tests share the demo's model cache so the embedded model is converted once per machine.
MODEL_CACHE = Path(os.environ.get("LORAFLEET_HOME", REPO_ROOT / ".lorafleet")) / "models"


def pytest_configure(config: pytest.Config) -> None:
    # vLLM's CPU backend sizes its KV cache as gpu_memory_utilization x the memory of the CPU's NUMA node, minus the
    # engine process's own RSS (~1.5 GiB with the embedded model). On a machine whose node is small (14 GiB seen,
    # 8 GiB elsewhere) the tests' 0.1-0.2 leave nothing, and every engine fails at start. A fixed KV cache (GiB; the
    # backend's own setting, inherited by the services the tests start) does not depend on the machine.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def unused_port() -> Callable[[], int]:
    return free_port


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    return MODEL_CACHE


@pytest.fixture(scope="session")
def embedded_model_path(model_cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a local safetensors folder (prepared once, cached)."""
    from lorafleet_common.embedded_model import prepare_embedded_model

    return prepare_embedded_model(model_cache_dir)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Config]:
    """A real S3 HTTP API (moto) on a loopback port, with bucket 'lorafleet'."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    cfg = S3Config(endpoint=f"127.0.0.1:{port}", access_key="test", secret_key="testsecret", timeout_s=10)
    from lorafleet_common.store import make_client

    client = make_client(cfg.endpoint, cfg.access_key, cfg.secret_key, secure=False, region=None, timeout_s=10)
    client.make_bucket("lorafleet")
    try:
        yield cfg
    finally:
        server.stop()
