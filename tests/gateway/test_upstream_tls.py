"""The gateway's channels to inference and trainer over mTLS: the real gateway (its own channel code) in front
of real gRPC servers (the scripted fakes) whose ports require a client certificate from the fleet CA."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from lorafleet.inference.v1 import inference_pb2_grpc
from lorafleet.trainer.v1 import trainer_pb2_grpc
from lorafleet_common.grpc_tls import GrpcTls, add_port
from lorafleet_common.store import LocalStore
from tests.common.grpc_certs import CertFiles, CertificateAuthority
from tests.gateway.gateway_fakes import FakeInference, FakeTrainer
from tests.gateway.gateway_harness import BASE_MODEL, Gateway, LoopThread, gateway_settings, start_gateway, stop_gateway


@dataclass
class TlsFleet:
    loop: LoopThread
    root: Path
    replica: FakeInference
    trainer: FakeTrainer
    fleet_ca: CertificateAuthority
    rogue_ca: CertificateAuthority
    gateways: list[Gateway]

    def gateway(self, tls: CertFiles | None) -> Gateway:
        """A gateway whose gRPC channels use ``tls`` (None: plaintext); stopped with the fleet."""
        settings = gateway_settings(
            self.root / "store",
            [f"127.0.0.1:{self.replica.port}"],
            f"127.0.0.1:{self.trainer.port}",
            **(tls.settings() if tls else {}),
            database_url=f"sqlite:///{self.root / f'gateway-{len(self.gateways)}.db'}",
            retry_attempts=0,
        )
        gateway = self.loop.run(start_gateway(settings, LocalStore(self.root / "store")))
        self.gateways.append(gateway)
        return gateway


async def serve_with_tls(servicer: Any, add: Any, tls: GrpcTls, with_health: bool) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    add(servicer, server)
    if with_health:
        servicer.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer.health, server)
        await servicer.health.set("", health_pb2.HealthCheckResponse.SERVING)
    port = add_port(server, "127.0.0.1:0", tls)
    await server.start()
    return server, port


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsFleet]:
    root = tmp_path_factory.mktemp("tls-fleet")
    fleet_ca, rogue_ca = CertificateAuthority(root / "pki", "fleet"), CertificateAuthority(root / "pki", "rogue")
    server_files = fleet_ca.issue("upstream")
    server_tls = GrpcTls.load(server_files.cert, server_files.key, server_files.ca)
    loop = LoopThread()
    replica, trainer = FakeInference("tls"), FakeTrainer(LocalStore(root / "store"))
    add_inference, add_trainer = (
        inference_pb2_grpc.add_InferenceServiceServicer_to_server,
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server,
    )
    inference_server, replica.port = loop.run(serve_with_tls(replica, add_inference, server_tls, True))
    trainer_server, trainer.port = loop.run(serve_with_tls(trainer, add_trainer, server_tls, False))
    state = TlsFleet(loop, root, replica, trainer, fleet_ca, rogue_ca, [])
    try:
        yield state
    finally:
        for gateway in state.gateways:
            loop.run(stop_gateway(gateway))
        loop.run(inference_server.stop(None))
        loop.run(trainer_server.stop(None))
        loop.stop()


def chat(gateway: Gateway) -> tuple[int, Any]:
    body = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    with gateway.http() as http:
        response = http.post("/v1/chat/completions", json=body)
    return response.status_code, response.json()


def test_gateway_reaches_inference_and_trainer_with_its_client_certificate(fleet: TlsFleet) -> None:
    gateway = fleet.gateway(fleet.fleet_ca.issue("gateway"))
    with gateway.http() as http:
        assert http.get("/ready").status_code == 200  # the health poll went over mTLS
        assert http.get("/v1/fine_tuning/jobs").status_code == 200  # trainer ListJobs over mTLS
    before = len(fleet.replica.requests)
    status, body = chat(gateway)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "Hello from base"
    assert len(fleet.replica.requests) == before + 1


@pytest.mark.parametrize("client", ["plaintext", "cert from another CA"])
def test_gateway_without_a_fleet_certificate_is_refused(fleet: TlsFleet, client: str) -> None:
    files = None if client == "plaintext" else fleet.rogue_ca.issue("intruder")
    if files is not None:  # it trusts the fleet CA: only the servers' check of its certificate can stop it
        files = CertFiles(files.cert, files.key, fleet.fleet_ca.ca_path)
    gateway = fleet.gateway(files)
    before = len(fleet.replica.requests)
    with gateway.http() as http:
        ready = http.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
        jobs = http.get("/v1/fine_tuning/jobs")
        assert jobs.status_code == 503 and jobs.json()["error"]["code"] == "service_unavailable"
    status, body = chat(gateway)
    assert status == 503 and body["error"]["code"] == "service_unavailable"
    assert len(fleet.replica.requests) == before  # nothing got through to the replica
