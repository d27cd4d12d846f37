"""lorafleet_common.healthcheck against real servers on loopback: grpc.health.v1 and plain HTTP."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lorafleet_common.healthcheck import main


@pytest.fixture
def health_server(unused_port: Callable[[], int]) -> Iterator[tuple[str, health.HealthServicer]]:
    port = unused_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(0)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/ready" else 503)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_url(unused_port: Callable[[], int]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", unused_port()), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_grpc_serving_is_healthy(health_server: tuple[str, health.HealthServicer]) -> None:
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert main(["grpc", target]) == 0


def test_grpc_not_serving_is_unhealthy(
    health_server: tuple[str, health.HealthServicer], capsys: pytest.CaptureFixture[str]
) -> None:
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main(["grpc", target]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err


def test_grpc_checks_a_named_service(health_server: tuple[str, health.HealthServicer]) -> None:
    target, servicer = health_server
    servicer.set("lorafleet.inference.v1.InferenceService", health_pb2.HealthCheckResponse.SERVING)
    assert main(["grpc", target, "--service", "lorafleet.inference.v1.InferenceService"]) == 0
    assert main(["grpc", target, "--service", "unknown.Service"]) == 1  # NOT_FOUND


def test_grpc_nothing_listening_fails_within_the_timeout(unused_port: Callable[[], int]) -> None:
    started = time.monotonic()
    assert main(["--timeout", "1", "grpc", f"127.0.0.1:{unused_port()}"]) == 1
    assert time.monotonic() - started < 5


def test_http_2xx_is_healthy_and_errors_are_not(http_url: str, unused_port: Callable[[], int]) -> None:
    assert main(["http", f"{http_url}/ready"]) == 0
    assert main(["http", f"{http_url}/other"]) == 1
    assert main(["--timeout", "1", "http", f"http://127.0.0.1:{unused_port()}/ready"]) == 1
    assert main(["http", "file:///etc/passwd"]) == 1


def test_runs_as_a_module_with_exit_codes(http_url: str) -> None:
    command = [sys.executable, "-m", "lorafleet_common.healthcheck", "http"]
    ok = subprocess.run([*command, f"{http_url}/ready"], capture_output=True, text=True, timeout=30, check=False)
    bad = subprocess.run([*command, f"{http_url}/nope"], capture_output=True, text=True, timeout=30, check=False)
    assert (ok.returncode, bad.returncode) == (0, 1)
    assert "healthy" in ok.stdout and "unhealthy: http" in bad.stderr
