"""gRPC mTLS (lorafleet_common.grpc_tls) on real servers on loopback: a real trainer and an inference gRPC
server bound with client-certificate auth, called by real clients with the right certificate, none, one
from another CA, and plaintext; the container health probe and the devstack probe; start-up errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import ValidationError

from lorafleet.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from lorafleet_common.devstack import LocalStack, StackConfig
from lorafleet_common.grpc_tls import ENV_CA, ENV_CERT, ENV_KEY, ENV_SERVER_NAME, GrpcTls, open_aio_channel
from lorafleet_common.healthcheck import main as healthcheck
from lorafleet_inference.grpc_server import InferenceServicer, build_server, set_serving
from lorafleet_inference.settings import InferenceSettings
from lorafleet_trainer.main import TrainerApp
from lorafleet_trainer.settings import TrainerSettings
from tests.common.grpc_certs import SERVER_NAME, CertFiles, CertificateAuthority

TLS_ENV = (ENV_CERT, ENV_KEY, ENV_CA, ENV_SERVER_NAME)


@dataclass(frozen=True)
class Pki:
    server: CertFiles  # the trainer's / replica's certificate, signed by the fleet CA
    client: CertFiles  # the gateway's, signed by the fleet CA
    intruder: CertFiles  # signed by another CA, trusting the fleet CA (so only the server's check can stop it)
    rogue_ca: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    fleet = CertificateAuthority(folder, "fleet")
    rogue = CertificateAuthority(folder, "rogue")
    intruder = rogue.issue("intruder")
    return Pki(
        server=fleet.issue("server"),
        client=fleet.issue("client"),
        intruder=CertFiles(intruder.cert, intruder.key, fleet.ca_path),
        rogue_ca=rogue.ca_path,
    )


@pytest.fixture(autouse=True)
def no_tls_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing from the caller's shell may configure TLS behind a test's back."""
    for name in TLS_ENV:
        monkeypatch.delenv(name, raising=False)


def tls_of(files: CertFiles, server_name: str | None = SERVER_NAME, ca: Path | None = None) -> GrpcTls:
    return GrpcTls.load(files.cert, files.key, ca or files.ca, server_name)


@pytest.fixture
async def trainer(tmp_path: Path, pki: Pki, unused_port: Callable[[], int]) -> AsyncIterator[TrainerApp]:
    """A real trainer whose gRPC port requires mTLS."""
    settings = TrainerSettings(
        home=tmp_path, grpc_port=unused_port(), metrics_port=0, shutdown_grace_s=1.0, **pki.server.settings()
    )
    app = TrainerApp(settings)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


async def list_jobs(channel: grpc.aio.Channel) -> str:
    """ "OK", or the status name the call failed with."""
    async with channel:
        try:
            await trainer_pb2_grpc.TrainerServiceStub(channel).ListJobs(
                trainer_pb2.ListJobsRequest(limit=1), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
    return "OK"


async def test_trainer_port_admits_only_clients_with_a_fleet_certificate(trainer: TrainerApp, pki: Pki) -> None:
    target = f"127.0.0.1:{trainer.port}"
    name_override = [("grpc.ssl_target_name_override", SERVER_NAME)]
    with_cert = tls_of(pki.client)
    assert await list_jobs(open_aio_channel(target, with_cert)) == "OK"
    async with open_aio_channel(target, with_cert) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    outcomes = {
        "plaintext": await list_jobs(open_aio_channel(target, None)),
        # TLS that trusts the fleet CA but presents no certificate.
        "no client cert": await list_jobs(
            grpc.aio.secure_channel(
                target, grpc.ssl_channel_credentials(pki.client.ca.read_bytes()), options=name_override
            )
        ),
        "cert from another CA": await list_jobs(open_aio_channel(target, tls_of(pki.intruder))),
        # The client checks the server too: a fleet client that trusts another CA refuses the trainer ...
        "server from an untrusted CA": await list_jobs(open_aio_channel(target, tls_of(pki.client, ca=pki.rogue_ca))),
        # ... and one that checks the dialed address (no name override) finds 127.0.0.1 is not in the cert.
        "server name mismatch": await list_jobs(open_aio_channel(target, tls_of(pki.client, server_name=None))),
    }
    assert outcomes == dict.fromkeys(outcomes, "UNAVAILABLE")


async def test_health_probes_present_the_service_certificate(
    trainer: TrainerApp, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = f"127.0.0.1:{trainer.port}"
    flags = ["--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key), "--tls-ca", str(pki.client.ca)]
    flags += ["--tls-server-name", SERVER_NAME]
    # Blocking clients: run them off the loop that serves the trainer.
    assert await asyncio.to_thread(healthcheck, ["grpc", target]) == 1  # plaintext against an mTLS port
    assert await asyncio.to_thread(healthcheck, ["grpc", target, *flags]) == 0
    intruder = ["--tls-cert", str(pki.intruder.cert), "--tls-key", str(pki.intruder.key)]
    assert await asyncio.to_thread(healthcheck, ["grpc", target, *flags, *intruder]) == 1
    assert await asyncio.to_thread(healthcheck, ["grpc", target, "--tls-cert", str(pki.client.cert)]) == 1  # incomplete

    # Inside a container the probe reads the service's own variables: no flags.
    for name, value in zip(TLS_ENV, (pki.client.cert, pki.client.key, pki.client.ca, SERVER_NAME), strict=True):
        monkeypatch.setenv(name, str(value))
    assert await asyncio.to_thread(healthcheck, ["grpc", target]) == 0

    # `make up`'s readiness probe does the same with the environment it gives the services.
    stack = LocalStack(StackConfig(home=tmp_path / "stack", trainer_port=trainer.port, admin_key="k"))
    assert await asyncio.to_thread(stack._ready, "trainer", tls_of(pki.client)) is True
    assert await asyncio.to_thread(stack._ready, "trainer", None) is False


async def test_inference_port_binds_with_client_certificate_auth(pki: Pki) -> None:
    health_servicer = health.aio.HealthServicer()
    server, port = build_server(InferenceServicer(), health_servicer, "127.0.0.1", 0, tls_of(pki.server))
    await set_serving(health_servicer, True)
    await server.start()
    try:
        request = health_pb2.HealthCheckRequest(service="lorafleet.inference.v1.InferenceService")

        async def check(tls: GrpcTls | None) -> str:
            async with open_aio_channel(f"127.0.0.1:{port}", tls) as channel:
                try:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(request, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

        assert await check(tls_of(pki.client)) == "SERVING"
        assert await check(None) == "UNAVAILABLE"
        assert await check(tls_of(pki.intruder)) == "UNAVAILABLE"
    finally:
        await server.stop(None)


def test_tls_settings_are_all_or_nothing_and_checked_at_start(pki: Pki, tmp_path: Path) -> None:
    assert TrainerSettings(home=tmp_path).grpc_tls() is None  # plaintext by default
    with pytest.raises(ValidationError) as incomplete:
        TrainerSettings(home=tmp_path, grpc_tls_cert=pki.server.cert)
    assert f"{ENV_KEY}, {ENV_CA} missing" in str(incomplete.value)

    missing = tmp_path / "nope.pem"
    with pytest.raises(ValidationError) as unreadable:
        TrainerSettings(home=tmp_path, **(pki.server.settings() | {"grpc_tls_key": missing}))
    assert f"{ENV_KEY}={missing}: cannot read it (No such file or directory)" in str(unreadable.value)

    with pytest.raises(ValidationError) as swapped:  # the certificate given as the key
        TrainerSettings(home=tmp_path, **(pki.server.settings() | {"grpc_tls_key": pki.server.cert}))
    assert f"{ENV_KEY}={pki.server.cert}: not a PEM file holding a PRIVATE KEY" in str(swapped.value)


def test_every_service_reads_the_shared_tls_variables(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorafleet_gateway.main import load_settings

    values = (pki.server.cert, pki.server.key, pki.server.ca, SERVER_NAME)
    for name, value in zip(TLS_ENV, values, strict=True):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path))
    monkeypatch.setenv("LORAFLEET_ADMIN_KEY", "admin")
    expected = tls_of(pki.server)
    assert load_settings().grpc_tls() == expected
    assert InferenceSettings().grpc_tls() == expected
    assert TrainerSettings().grpc_tls() == expected

    monkeypatch.setenv(ENV_CA, str(tmp_path / "missing-ca.pem"))
    with pytest.raises(SystemExit) as exited:
        load_settings()
    assert exited.value.code == 2
    assert f"{ENV_CA}={tmp_path / 'missing-ca.pem'}: cannot read it" in capsys.readouterr().err
