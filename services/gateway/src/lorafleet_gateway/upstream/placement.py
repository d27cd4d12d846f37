"""Explicit adapter placement: LoadAdapter / UnloadAdapter on every inference replica, with per-replica outcomes.

Routing loads adapters on demand; these calls are for operators who want an
adapter warm (or pinned) before traffic arrives, or gone from GPU memory now.
Each replica's answer is reported separately: one replica being down must not
hide that the others did the work.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

from lorafleet.inference.v1 import inference_pb2
from lorafleet_gateway.errors import GatewayError, ModelNotFound, from_grpc
from lorafleet_gateway.upstream.inference import InferencePool
from lorafleet_gateway.upstream.replicas import Replica
from lorafleet_gateway.upstream.routing import same_adapter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaOutcome:
    """What one replica answered: ``loaded`` is the adapter's state there afterwards (None if the call failed)."""

    replica: str
    loaded: bool | None
    version: str | None = None
    error: GatewayError | None = None


async def load_everywhere(pool: InferencePool, adapter: str, *, pin: bool, timeout_s: float) -> list[ReplicaOutcome]:
    """LoadAdapter(``adapter``) on every replica at once."""

    async def load(replica: Replica) -> ReplicaOutcome:
        request = inference_pb2.LoadAdapterRequest(adapter=adapter, pin=pin)
        try:
            info = await replica.stub.LoadAdapter(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            logger.info("could not load %s on %s: %s", adapter, replica.target, exc.code().name)
            error = from_grpc(exc, upstream=f"inference replica {replica.target}", not_found=ModelNotFound)
            return ReplicaOutcome(replica.target, None, error=error)
        # Routing sees it at once rather than at the next Stats poll.
        replica.adapters = replica.adapters | {f"{info.name}@{info.version}"}
        return ReplicaOutcome(replica.target, info.loaded, info.version)

    return list(await asyncio.gather(*(load(r) for r in pool.replicas)))


async def unload_everywhere(pool: InferencePool, adapter: str, *, timeout_s: float) -> list[ReplicaOutcome]:
    """UnloadAdapter(``adapter``) on every replica at once ("name" unloads every version)."""

    async def unload(replica: Replica) -> ReplicaOutcome:
        request = inference_pb2.UnloadAdapterRequest(adapter=adapter)
        try:
            await replica.stub.UnloadAdapter(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            logger.info("could not unload %s from %s: %s", adapter, replica.target, exc.code().name)
            error = from_grpc(exc, upstream=f"inference replica {replica.target}", not_found=ModelNotFound)
            return ReplicaOutcome(replica.target, None, error=error)
        replica.adapters = frozenset(a for a in replica.adapters if not same_adapter(a, adapter))
        return ReplicaOutcome(replica.target, False)

    return list(await asyncio.gather(*(unload(r) for r in pool.replicas)))


def loaded_versions(pool: InferencePool, name: str) -> dict[str, list[str]]:
    """Replica target -> versions of the adapter stored as ``name`` it has loaded or merged (as of its last Stats
    poll)."""
    placement: dict[str, list[str]] = {}
    for replica in pool.replicas:
        entries = {*replica.adapters, replica.merged_adapter} if replica.mode == "merged" else replica.adapters
        versions = sorted(v for n, _, v in (a.partition("@") for a in entries) if n == name)
        if versions:
            placement[replica.target] = versions
    return placement


def merged_versions(pool: InferencePool, name: str) -> dict[str, str]:
    """Replica target -> the version of the adapter stored as ``name`` merged into its weights (MERGED mode only)."""
    merged: dict[str, str] = {}
    for replica in pool.replicas:
        merged_name, _, version = replica.merged_adapter.partition("@")
        if replica.mode == "merged" and merged_name == name:
            merged[replica.target] = version
    return merged
