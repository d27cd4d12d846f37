"""Run the three services as local background processes: ``make up`` / ``make down``.

Everything lives under one folder (``$LORAFLEET_HOME``): the object store,
databases, caches, ``logs/<service>.log`` and ``run/<service>.pid``. The demo
and the end-to-end tests drive the same code, with their own ports and home.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorafleet_common.grpc_tls import GrpcTls, GrpcTlsError, open_channel, tls_from_env

SERVICES = ("trainer", "inference", "gateway")


@dataclass
class StackConfig:
    """Ports and folders of one local stack."""

    home: Path
    gateway_port: int = 8000
    inference_port: int = 50051
    inference_metrics_port: int = 9101
    trainer_port: int = 50061
    trainer_metrics_port: int = 9102
    admin_key: str = ""
    extra_env: Mapping[str, str] = field(default_factory=dict)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> StackConfig:
        home = Path(env.get("LORAFLEET_HOME", Path.cwd() / ".lorafleet")).resolve()
        return cls(
            home=home,
            gateway_port=int(env.get("LORAFLEET_GATEWAY_PORT", 8000)),
            inference_port=int(env.get("LORAFLEET_INFERENCE_GRPC_PORT", 50051)),
            inference_metrics_port=int(env.get("LORAFLEET_INFERENCE_METRICS_PORT", 9101)),
            trainer_port=int(env.get("LORAFLEET_TRAINER_GRPC_PORT", 50061)),
            trainer_metrics_port=int(env.get("LORAFLEET_TRAINER_METRICS_PORT", 9102)),
            admin_key=env.get("LORAFLEET_ADMIN_KEY", ""),
        )


class StackError(RuntimeError):
    """A service did not start or stop as expected."""


class LocalStack:
    """Starts, checks and stops the trainer, inference and gateway processes."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.logs = config.home / "logs"
        self.run = config.home / "run"

    def admin_key(self) -> str:
        """LORAFLEET_ADMIN_KEY if given, else the key stored under home, else a new one (saved 0600)."""
        if self.config.admin_key:
            return self.config.admin_key
        path = self.config.home / "admin_key"
        if path.exists():
            return path.read_text().strip()
        key = "lf-admin-" + secrets.token_urlsafe(24)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(key + "\n")
        return key

    def _env(self) -> dict[str, str]:
        cfg = self.config
        env = dict(os.environ)
        env.update(
            {
                "LORAFLEET_HOME": str(cfg.home),
                "LORAFLEET_ADMIN_KEY": self.admin_key(),
                "LORAFLEET_GATEWAY_PORT": str(cfg.gateway_port),
                "LORAFLEET_GATEWAY_INFERENCE_TARGETS": f"127.0.0.1:{cfg.inference_port}",
                "LORAFLEET_GATEWAY_TRAINER_TARGET": f"127.0.0.1:{cfg.trainer_port}",
                "LORAFLEET_INFERENCE_GRPC_PORT": str(cfg.inference_port),
                "LORAFLEET_INFERENCE_METRICS_PORT": str(cfg.inference_metrics_port),
                "LORAFLEET_TRAINER_GRPC_PORT": str(cfg.trainer_port),
                "LORAFLEET_TRAINER_METRICS_PORT": str(cfg.trainer_metrics_port),
                # A published adapter is loaded into the local replica at once: the first request finds it warm.
                "LORAFLEET_TRAINER_NOTIFY_INFERENCE": f"127.0.0.1:{cfg.inference_port}",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(cfg.extra_env)
        return env

    def pid(self, service: str) -> int | None:
        path = self.run / f"{service}.pid"
        try:
            pid = int(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if not _alive(pid):
            path.unlink(missing_ok=True)
            return None
        return pid

    def start(self, timeout_s: float = 600.0) -> None:
        """Start every service that is not running and wait until all are ready."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.run.mkdir(parents=True, exist_ok=True)
        env = self._env()
        for service in SERVICES:
            if self.pid(service):
                continue
            log = (self.logs / f"{service}.log").open("ab")
            proc = subprocess.Popen(
                [sys.executable, "-m", f"lorafleet_{service}"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: `down` stops its children too
            )
            (self.run / f"{service}.pid").write_text(f"{proc.pid}\n")
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = set(SERVICES)
        # The services' own LORAFLEET_GRPC_TLS_*: when their ports require mTLS, the probe presents that cert too.
        try:
            tls = tls_from_env(self._env())
        except GrpcTlsError as exc:
            raise StackError(str(exc)) from exc
        while pending:
            for service in sorted(pending):
                if not self.pid(service):
                    raise StackError(f"{service} exited during start-up:\n{self.log_tail(service)}")
                if self._ready(service, tls):
                    pending.discard(service)
            if pending and time.monotonic() > deadline:
                raise StackError(f"not ready after {timeout_s:.0f} s: {', '.join(sorted(pending))}")
            if pending:
                time.sleep(0.5)

    def _ready(self, service: str, tls: GrpcTls | None = None) -> bool:
        if service == "gateway":
            try:
                with urllib.request.urlopen(f"{self.config.gateway_url}/ready", timeout=2) as resp:
                    return bool(resp.status == 200)
            except (urllib.error.URLError, OSError):
                return False
        port = self.config.trainer_port if service == "trainer" else self.config.inference_port
        with open_channel(f"127.0.0.1:{port}", tls) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.RpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def stop(self, timeout_s: float = 60.0) -> list[str]:
        """SIGTERM each service's process group (gateway first), wait, then SIGKILL stragglers."""
        stopped = []
        for service in reversed(SERVICES):
            pid = self.pid(service)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.2)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            (self.run / f"{service}.pid").unlink(missing_ok=True)
            stopped.append(service)
        return stopped

    def log_tail(self, service: str, lines: int = 40) -> str:
        try:
            return "\n".join((self.logs / f"{service}.log").read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def _alive(pid: int) -> bool:
    """Whether pid runs. A child that exited is reaped; an exited process nobody reaped (a zombie,
    e.g. started by another process) still answers kill(pid, 0), so its /proc state is checked."""
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorafleet_common.devstack", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    stack = LocalStack(StackConfig.from_env(os.environ))
    if args.command == "up":
        print(f"starting trainer, inference and gateway (logs: {stack.logs}) ...", flush=True)
        try:
            stack.start()
        except StackError as exc:
            print(f"error: {exc}", file=sys.stderr)
            stack.stop()
            return 1
        print(f"LoRA Fleet is up: {stack.config.gateway_url}/v1")
        print(f"admin API key: {stack.admin_key()}  (also in {stack.config.home / 'admin_key'})")
    elif args.command == "down":
        stopped = stack.stop()
        print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    else:
        for service in SERVICES:
            pid = stack.pid(service)
            state = f"running (pid {pid})" if pid else "stopped"
            print(f"{service:10s} {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
