"""`python -m lorafleet_inference` as operators run it: env settings, SERVING, SIGTERM drains and exits."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorafleet.inference.v1 import inference_pb2 as pb
from lorafleet.inference.v1 import inference_pb2_grpc as pb_grpc
from tests.conftest import free_port

pytestmark = pytest.mark.engine


async def wait_for_status(health: health_pb2_grpc.HealthStub, want: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    status = -1
    while time.monotonic() < deadline:
        try:
            status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=2)).status
            if status == want:
                return status
        except grpc.aio.AioRpcError:
            pass  # not listening yet
        await asyncio.sleep(0.5)
    return status


async def test_process_serves_and_drains_on_sigterm(
    tmp_path: Path, model_cache_dir: Path, embedded_model_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(model_cache_dir)  # reuse the prepared embedded model
    port = free_port()
    env = {
        **os.environ,
        "LORAFLEET_HOME": str(home),
        "LORAFLEET_INFERENCE_GRPC_PORT": str(port),
        "LORAFLEET_INFERENCE_METRICS_PORT": "0",
        "LORAFLEET_INFERENCE_MAX_LORA_RANK": "8",
        "LORAFLEET_INFERENCE_MAX_LORAS": "1",
        "LORAFLEET_INFERENCE_MAX_CPU_LORAS": "2",
        "LORAFLEET_INFERENCE_MAX_MODEL_LEN": "256",
        "LORAFLEET_INFERENCE_DRAIN_TIMEOUT_S": "20",
    }
    log_path = tmp_path / "inference.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lorafleet_inference"], env=env, stdout=log, stderr=log)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            serving = health_pb2.HealthCheckResponse.SERVING
            assert await wait_for_status(health, serving, 180) == serving, log_path.read_text()[-3000:]
            stub = pb_grpc.InferenceServiceStub(channel)
            call = stub.Generate(
                pb.GenerateRequest(prompt="Once upon a time", sampling=pb.SamplingParams(max_tokens=32, temperature=0)),
                timeout=60,
            )
            first = await call.read()
            assert first.token_count > 0
            proc.send_signal(signal.SIGTERM)
            rest = []
            while (chunk := await call.read()) is not grpc.aio.EOF:
                rest.append(chunk)
            assert rest and rest[-1].HasField("usage"), "the in-flight stream was cut instead of drained"
        assert await asyncio.to_thread(proc.wait, 60) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "inference stopped" in log_path.read_text()
