"""Container healthchecks: ``python -m lorafleet_common.healthcheck grpc|http TARGET``.

Docker's HEALTHCHECK and compose's ``healthcheck:`` run a command inside the
container, and the images ship no curl or grpc_health_probe. This module is
that command: it asks the standard ``grpc.health.v1`` service (inference,
trainer) or GETs an HTTP URL (the gateway's ``/ready``), prints one line, and
exits 0 when healthy, 1 otherwise. Kubernetes uses native ``grpc:`` and
``httpGet:`` probes instead, except with gRPC mTLS (native probes cannot
present a client certificate), where the chart runs this module.

When the service's gRPC port requires mTLS, the probe presents the same
certificate: ``--tls-cert/--tls-key/--tls-ca/--tls-server-name`` default to
``LORAFLEET_GRPC_TLS_*``, the variables the service itself reads, so inside
its container no flag is needed.

Stdlib plus grpcio-health-checking only, so it runs in every image.

    python -m lorafleet_common.healthcheck grpc 127.0.0.1:50051
    python -m lorafleet_common.healthcheck http http://127.0.0.1:8000/ready
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorafleet_common.grpc_tls import (
    ENV_CA,
    ENV_CERT,
    ENV_KEY,
    ENV_SERVER_NAME,
    GrpcTls,
    GrpcTlsError,
    load_tls,
    open_channel,
)

DEFAULT_TIMEOUT_S = 3.0


class Unhealthy(Exception):
    """The target answered that it is not healthy, or did not answer in time."""


def check_grpc(target: str, service: str = "", timeout_s: float = DEFAULT_TIMEOUT_S, tls: GrpcTls | None = None) -> str:
    """The serving status of ``service`` at ``target`` (over mTLS when ``tls``); Unhealthy unless SERVING."""
    with open_channel(target, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            name = code.name if code is not None else "UNKNOWN"
            raise Unhealthy(f"grpc {target}: {name}") from exc
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise Unhealthy(f"grpc {target}: {status}")
    return f"grpc {target}: {status}"


def check_http(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """GET ``url``; raise Unhealthy unless it answers 2xx."""
    if not url.startswith(("http://", "https://")):
        raise Unhealthy(f"http {url}: not an http(s) URL")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return f"http {url}: {response.status}"
    except urllib.error.HTTPError as exc:
        raise Unhealthy(f"http {url}: {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise Unhealthy(f"http {url}: {reason}") from exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lorafleet_common.healthcheck", description=__doc__.split("\n")[0])
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds (default 3)")
    kinds = parser.add_subparsers(dest="kind", required=True)
    grpc_parser = kinds.add_parser("grpc", help="ask grpc.health.v1 at HOST:PORT")
    grpc_parser.add_argument("target", help="host:port")
    grpc_parser.add_argument("--service", default="", help="service name to check (default: the whole server)")
    env = os.environ
    for flag, variable, what in (
        ("--tls-cert", ENV_CERT, "client certificate (PEM)"),
        ("--tls-key", ENV_KEY, "its private key (PEM)"),
        ("--tls-ca", ENV_CA, "CA bundle the server's certificate must chain to (PEM)"),
        ("--tls-server-name", ENV_SERVER_NAME, "name to check the server's certificate against"),
    ):
        grpc_parser.add_argument(flag, default=env.get(variable), help=f"mTLS: {what} (default: ${variable})")
    http_parser = kinds.add_parser("http", help="GET a URL and expect 2xx")
    http_parser.add_argument("url")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.kind == "grpc":
            tls = load_tls(args.tls_cert, args.tls_key, args.tls_ca, args.tls_server_name)
            line = check_grpc(args.target, args.service, args.timeout, tls)
        else:
            line = check_http(args.url, args.timeout)
    except (Unhealthy, GrpcTlsError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print(f"healthy: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
