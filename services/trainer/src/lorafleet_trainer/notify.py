"""Tell the inference fleet that an adapter was published, so its first request finds it loaded.

Best effort: each target gets one ``LoadAdapter`` call with a deadline; a replica that is
down or refuses only costs a cold load later (replicas load published adapters on demand).
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

import grpc

from lorafleet.inference.v1 import inference_pb2, inference_pb2_grpc
from lorafleet_common.grpc_targets import DNS_SCHEME
from lorafleet_common.grpc_tls import GrpcTls, open_aio_channel


@dataclass(frozen=True)
class PreloadResult:
    target: str
    error: str | None  # None: the replica has the adapter loaded


async def expand_targets(targets: list[str]) -> list[str]:
    """ "host:port" as is; "dns:///name:port" becomes every address the name resolves to (each replica)."""
    expanded: list[str] = []
    loop = asyncio.get_running_loop()
    for target in targets:
        if not target.startswith(DNS_SCHEME):
            expanded.append(target)
            continue
        host, _, port = target.removeprefix(DNS_SCHEME).rpartition(":")
        try:
            infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError):
            expanded.append(target)  # the call below reports why it cannot be reached
            continue
        for info in infos:
            address = str(info[4][0])
            expanded.append(f"[{address}]:{port}" if ":" in address else f"{address}:{port}")
    return list(dict.fromkeys(expanded))


async def _load_on(target: str, adapter: str, timeout_s: float, tls: GrpcTls | None) -> PreloadResult:
    try:
        async with open_aio_channel(target, tls) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            await stub.LoadAdapter(inference_pb2.LoadAdapterRequest(adapter=adapter), timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        return PreloadResult(target, f"{exc.code().name}: {exc.details()}")
    except Exception as exc:  # a bad target string, a TLS problem: still only a missed preload
        return PreloadResult(target, f"{type(exc).__name__}: {exc}")
    return PreloadResult(target, None)


async def preload_adapter(
    targets: list[str], name: str, version: str, timeout_s: float, tls: GrpcTls | None
) -> list[PreloadResult]:
    """Ask every target to load ``name@version``, all at once; one result per (expanded) target."""
    replicas = await expand_targets(targets)
    return list(await asyncio.gather(*(_load_on(t, f"{name}@{version}", timeout_s, tls) for t in replicas)))
