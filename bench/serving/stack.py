"""Our services as processes on loopback, through their real entry points: ``python -m lorafleet_inference``
(gRPC + metrics) and ``python -m lorafleet_gateway`` (HTTP, a tenant API key), configured by environment."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise SystemExit(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 60) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of one process so far, every thread it ran included; None where Linux has no answer.

    Read from the process's CPU-time clock (clock_getcpuclockid's id, which Python does not wrap: Linux encodes it
    as ``~pid << 3 | CPUCLOCK_SCHED``), in nanoseconds. /proc/PID/stat counts in clock ticks (10 ms): a smoke run
    of a few dozen requests through a lean relay on a fast CPU used less than one tick and read as 0."""
    try:
        return time.clock_gettime((~pid << 3) | 2)
    except (OSError, AttributeError):
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float | None:
    """cpu_seconds of a process and its live descendants (a gateway's worker processes); None elsewhere."""
    own = cpu_seconds(pid)
    if own is None:
        return None
    try:
        children = [
            int(child)
            for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()
        ]
    except OSError:
        children = []
    return own + sum(tree_cpu_seconds(child) or 0.0 for child in children)


def service_env(values: dict[str, str]) -> dict[str, str]:
    """This process's environment without any LORAFLEET_* setting of its own, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    env.update(values)
    return env


def start(name: str, module: str, env: dict[str, str], logs: Path) -> Service:
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", module], env=env, stdout=out, stderr=subprocess.STDOUT)
    return Service(name, proc, log)


def start_inference(logs: Path, settings: dict[str, str]) -> tuple[Service, int, int]:
    """A replica with ``settings`` (LORAFLEET_* names); returns it with its gRPC and metrics ports."""
    grpc_port, metrics_port = free_port(), free_port()
    env = service_env(
        settings
        | {
            "LORAFLEET_INFERENCE_HOST": "127.0.0.1",
            "LORAFLEET_INFERENCE_GRPC_PORT": str(grpc_port),
            "LORAFLEET_INFERENCE_METRICS_PORT": str(metrics_port),
        }
    )
    return start("inference", "lorafleet_inference", env, logs), grpc_port, metrics_port


def wait_serving(service: Service, port: int, timeout_s: float) -> float:
    """Poll the replica's grpc.health.v1 until SERVING; returns the seconds it took."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    started = time.monotonic()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() - started < timeout_s:
            service.check_alive()
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - started
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise SystemExit(f"inference not SERVING after {timeout_s:.0f} s:\n{service.tail()}")


def start_gateway(logs: Path, index: int, settings: dict[str, str]) -> tuple[Service, str]:
    port = free_port()
    env = service_env(settings | {"LORAFLEET_GATEWAY_HOST": "127.0.0.1", "LORAFLEET_GATEWAY_PORT": str(port)})
    return start(f"gateway-{index}", "lorafleet_gateway", env, logs), f"http://127.0.0.1:{port}"


def start_bare_relay(logs: Path, target: str, base_model: str) -> tuple[Service, str]:
    """bench/bare_relay.py in front of the replica ``target``: the least any Python relay adds, beside the gateways."""
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / "bare-relay.log"
    script = Path(__file__).resolve().parents[1] / "bare_relay.py"
    command = [sys.executable, str(script), "--port", str(port), "--target", target, "--base-model", base_model]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=service_env({}), stdout=out, stderr=subprocess.STDOUT)
    return Service("bare-relay", proc, log), f"http://127.0.0.1:{port}"


def wait_ready(service: Service, url: str, timeout_s: float, path: str = "/ready") -> None:
    """/ready answers 200 once the gateway has a healthy replica; /health once it serves at all."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        service.check_alive()
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{service.name} not ready after {timeout_s:.0f} s:\n{service.tail()}")


def tenant_key(url: str, admin_key: str, tenant: str) -> str:
    """A tenant API key with limits far above the benchmark's load (auth and rate limiting stay on the path)."""
    admin = {"Authorization": f"Bearer {admin_key}"}
    httpx.post(f"{url}/v1/admin/tenants", json={"id": tenant, "name": tenant}, headers=admin, timeout=30)
    limits = {"rpm_limit": 10**8, "tpm_limit": 10**9}  # the largest the admin API takes
    created = httpx.post(f"{url}/v1/admin/tenants/{tenant}/keys", json=limits, headers=admin, timeout=30)
    if not created.is_success:
        raise SystemExit(f"could not create an API key: {created.status_code} {created.text[:500]}")
    return str(created.json()["key"])
