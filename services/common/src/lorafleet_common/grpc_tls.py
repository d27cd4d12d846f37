"""Mutual TLS on the internal gRPC ports: inference and trainer servers, and everything that calls them.

Off by default: plaintext is right on loopback and inside a network that only
the gateway can reach (docs/security.md says when to turn it on). When the
three PEM files are configured (``LORAFLEET_GRPC_TLS_CERT``, ``..._KEY``,
``..._CA``), servers accept only clients presenting a certificate signed by
the CA bundle, and clients verify the server's certificate against the same
bundle while presenting their own. One certificate per process serves both
roles (server on the inference/trainer side, client on the gateway side), so a
fleet can share one cert issued for both usages, or use one per service.

The server's certificate must name the host the client dials (its SAN), or
``LORAFLEET_GRPC_TLS_SERVER_NAME`` when set: the gateway dials addresses
(DNS-resolved replicas, 127.0.0.1 in health probes) that a certificate rarely
lists, so one fixed name in every certificate is the simple way.

Stdlib and grpcio only: the container health probe imports this too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

ENV_CERT = "LORAFLEET_GRPC_TLS_CERT"
ENV_KEY = "LORAFLEET_GRPC_TLS_KEY"
ENV_CA = "LORAFLEET_GRPC_TLS_CA"
ENV_SERVER_NAME = "LORAFLEET_GRPC_TLS_SERVER_NAME"

ChannelOptions = Sequence[tuple[str, Any]]


class GrpcTlsError(ValueError):
    """The TLS configuration is incomplete, or a file is missing, unreadable or not PEM."""


def _read_pem(variable: str, path: Path, marker: bytes) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GrpcTlsError(f"{variable}={path}: cannot read it ({exc.strerror or exc})") from exc
    if b"-----BEGIN " not in data or marker not in data:
        kind = marker.decode().strip("- ")
        raise GrpcTlsError(f"{variable}={path}: not a PEM file holding a {kind}")
    return data


@dataclass(frozen=True)
class GrpcTls:
    """The PEM material of one process: its certificate chain and key, and the CA bundle it trusts."""

    cert_chain: bytes
    private_key: bytes = field(repr=False)
    root_ca: bytes
    server_name: str | None = None

    @classmethod
    def load(cls, cert: Path, key: Path, ca: Path, server_name: str | None = None) -> GrpcTls:
        """Read and sanity-check the three files; GrpcTlsError names the variable and file that is wrong."""
        return cls(
            cert_chain=_read_pem(ENV_CERT, cert, b"CERTIFICATE-----"),
            private_key=_read_pem(ENV_KEY, key, b"PRIVATE KEY-----"),
            root_ca=_read_pem(ENV_CA, ca, b"CERTIFICATE-----"),
            server_name=server_name or None,
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials of a server that requires (and verifies) a client certificate."""
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)], root_certificates=self.root_ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials of a client that verifies the server against the CA bundle and presents its own cert."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_ca, private_key=self.private_key, certificate_chain=self.cert_chain
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        """Options a client channel needs: the name to verify the server's certificate against, if fixed."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def load_tls(
    cert: Path | str | None, key: Path | str | None, ca: Path | str | None, server_name: str | None = None
) -> GrpcTls | None:
    """GrpcTls from the three paths, or None (plaintext) when none is given; some but not all is an error."""
    given = {ENV_CERT: cert, ENV_KEY: key, ENV_CA: ca}
    if not any(given.values()):
        return None
    missing = [name for name, value in given.items() if not value]
    if missing:
        raise GrpcTlsError(f"gRPC mTLS needs {ENV_CERT}, {ENV_KEY} and {ENV_CA} together; {', '.join(missing)} missing")
    assert cert and key and ca  # for mypy: checked just above
    return GrpcTls.load(Path(cert), Path(key), Path(ca), server_name)


def tls_from_env(env: Mapping[str, str]) -> GrpcTls | None:
    """The same configuration read from an environment (probes that run beside a service, without its settings)."""
    return load_tls(env.get(ENV_CERT), env.get(ENV_KEY), env.get(ENV_CA), env.get(ENV_SERVER_NAME))


def add_port(server: grpc.Server | grpc.aio.Server, address: str, tls: GrpcTls | None) -> int:
    """Bind ``address`` with mTLS when ``tls`` is given, else plaintext; returns the port (0: could not bind)."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.server_credentials())


def open_channel(target: str, tls: GrpcTls | None, options: ChannelOptions = ()) -> grpc.Channel:
    """A blocking channel to ``target``: mTLS when ``tls`` is given, else plaintext."""
    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, tls.channel_credentials(), options=[*options, *tls.channel_options()])


def open_aio_channel(target: str, tls: GrpcTls | None, options: ChannelOptions = ()) -> grpc.aio.Channel:
    """An asyncio channel to ``target``: mTLS when ``tls`` is given, else plaintext."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=[*options, *tls.channel_options()])
