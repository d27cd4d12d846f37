"""The app factory: create_app(settings, deps). No module-level app."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from lorafleet_gateway.adapters.router import admin_router as adapters_admin_router
from lorafleet_gateway.adapters.router import router as adapters_router
from lorafleet_gateway.adapters.service import AdapterService, PlacementTimeouts, replica_label
from lorafleet_gateway.auth import AdminDep, Authenticator, DefaultLimits, is_admin
from lorafleet_gateway.chat.router import CHAT_ROUTE
from lorafleet_gateway.chat.router import router as chat_router
from lorafleet_gateway.completions.router import COMPLETIONS_ROUTE
from lorafleet_gateway.completions.router import router as completions_router
from lorafleet_gateway.console.router import install_console
from lorafleet_gateway.db.database import migrate, open_engine
from lorafleet_gateway.deps import GatewayDeps, GatewayServices, services
from lorafleet_gateway.errors import install_error_handlers
from lorafleet_gateway.files.router import router as files_router
from lorafleet_gateway.files.service import FileService
from lorafleet_gateway.fine_tuning.router import router as fine_tuning_router
from lorafleet_gateway.fine_tuning.service import FineTuningService
from lorafleet_gateway.generation.fast_path import GatewayApp, GenerationFastPath, bind_routes
from lorafleet_gateway.generation.service import GenerationService
from lorafleet_gateway.metrics import GatewayMetrics
from lorafleet_gateway.middleware import BodyLimitMiddleware, MetricsMiddleware
from lorafleet_gateway.models.router import router as models_router
from lorafleet_gateway.models.service import ModelCatalog
from lorafleet_gateway.openapi import BEARER_SCHEME, ERROR_RESPONSES, install_openapi
from lorafleet_gateway.quotas import RateLimiter
from lorafleet_gateway.settings import GatewaySettings
from lorafleet_gateway.tenancy.directory import TenantDirectory
from lorafleet_gateway.tenancy.router import router as admin_router
from lorafleet_gateway.upstream.hot_adapters import HotAdapterPlanner, MergePolicy
from lorafleet_gateway.upstream.inference import InferencePool, InferenceTimeouts, RoutingPolicy
from lorafleet_gateway.upstream.trainer import TrainerClient
from lorafleet_gateway.workers import WorkerRole

logger = logging.getLogger(__name__)

ops_router = APIRouter(tags=["operations"])


@ops_router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process serves HTTP."""
    return {"status": "ok"}


@ops_router.get(
    "/ready",
    responses={503: {"description": "No inference replica is serving (same body, status 'unavailable')."}},
)
async def ready(request: Request) -> JSONResponse:
    """Readiness: at least one inference replica answers its gRPC health check with SERVING.

    Needs no key (load balancers and probes call it); replica addresses are shown to the admin key only,
    anyone else sees the opaque ids the adapters API shows tenants.
    """
    replicas = await services(request).pool.check_health()
    ok = any(replicas.values())
    admin = await is_admin(request)
    shown = {replica_label(target, admin=admin): up for target, up in replicas.items()}
    return JSONResponse({"status": "ready" if ok else "unavailable", "replicas": shown}, status_code=200 if ok else 503)


@ops_router.get(
    "/metrics",
    response_class=Response,
    responses={
        **ERROR_RESPONSES,
        200: {"description": "Prometheus text exposition format.", "content": {"text/plain": {}}},
    },
    openapi_extra={"security": [{BEARER_SCHEME: []}]},
)
async def metrics(request: Request, _admin: AdminDep) -> Response:
    """Prometheus metrics of this gateway (all its workers). Admin key only: the labels name every tenant and its
    adapters."""
    return Response(services(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def merge_policy(settings: GatewaySettings, worker: WorkerRole | None = None) -> MergePolicy:
    # The planning worker sees about 1/count of the gateway's traffic (connections spread evenly over the
    # workers): shares are the same in any sample, the absolute rate is not.
    sampled = worker.count if worker is not None else 1
    return MergePolicy(
        interval_s=settings.merge_interval_s,
        window_s=settings.merge_window_s,
        merge_share=settings.merge_share,
        unmerge_share=settings.unmerge_share,
        min_tokens_per_s=settings.merge_min_tokens_per_s / sampled,
        min_hold_s=settings.merge_min_hold_s,
        timeout_s=settings.merge_timeout_s,
        allow_all_replicas=settings.merge_allow_all_replicas,
    )


def create_app(settings: GatewaySettings, deps: GatewayDeps | None = None, worker: WorkerRole | None = None) -> FastAPI:
    """Build the gateway; gRPC channels open in the lifespan and close on shutdown.

    ``worker``: this process is one of several gateway workers (workers.py), None when it is the whole gateway.
    """
    deps = deps or GatewayDeps.from_settings(settings)
    gateway_metrics = GatewayMetrics(deps.registry, multiprocess_dir=worker.metrics_dir if worker else None)
    plans_merges = settings.merge_enabled and (worker is None or worker.plans_merges)
    limiter = RateLimiter(gateway_metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = open_engine(settings.resolved_database_url(), timeout_s=settings.connect_timeout_s)
        tls = settings.grpc_tls()  # re-read at each start: a restart picks up rotated certificates
        if worker is None:  # workers start on the database their supervisor migrated
            await asyncio.to_thread(migrate, engine)
        directory = TenantDirectory(engine)
        app.state.authenticator = Authenticator(
            settings.admin_key,
            directory,
            defaults=DefaultLimits(rpm=settings.default_rpm_limit, tpm=settings.default_tpm_limit),
            cache_s=settings.auth_cache_s,
        )
        pool = InferencePool(
            settings.inference_targets,
            timeouts=InferenceTimeouts(
                connect_s=settings.connect_timeout_s,
                first_token_s=settings.first_token_timeout_s,
                request_s=settings.request_timeout_s,
                stream_idle_s=settings.stream_idle_timeout_s,
            ),
            health_interval_s=settings.health_interval_s,
            metrics=gateway_metrics,
            policy=RoutingPolicy(
                retry_attempts=settings.retry_attempts,
                load_factor=settings.affinity_load_factor,
                min_slack=settings.affinity_min_slack,
                merged_max_in_flight=settings.merged_max_in_flight,
            ),
            dns_refresh_s=settings.dns_refresh_s,
            eject_after=settings.eject_after_failures,
            tls=tls,
        )
        trainer = TrainerClient(
            settings.trainer_target,
            connect_timeout_s=settings.connect_timeout_s,
            timeout_s=settings.trainer_timeout_s,
            tls=tls,
        )
        hot_adapters = (
            HotAdapterPlanner(pool, merge_policy(settings, worker), gateway_metrics) if plans_merges else None
        )
        await pool.start()
        await trainer.start()
        if hot_adapters is not None:
            await hot_adapters.start()
        catalog = ModelCatalog(deps.store, settings.base_model, outage_grace_s=settings.store_outage_grace_s)
        files = FileService(deps.store, max_line_bytes=settings.max_file_line_bytes)
        app.state.services = GatewayServices(
            pool=pool,
            trainer=trainer,
            catalog=catalog,
            generation=GenerationService(
                catalog,
                pool,
                gateway_metrics,
                limiter,
                max_prompt_chars=settings.max_prompt_chars,
                on_tokens=hot_adapters.record if hot_adapters is not None else None,
            ),
            files=files,
            fine_tuning=FineTuningService(deps.store, trainer, files, settings.base_model),
            metrics=gateway_metrics,
            directory=directory,
            adapters=AdapterService(
                deps.store,
                catalog,
                pool,
                gateway_metrics,
                PlacementTimeouts(load_s=settings.first_token_timeout_s, unload_s=settings.connect_timeout_s),
            ),
            hot_adapters=hot_adapters,
        )
        logger.info(
            "gateway serving %s; inference %s; trainer %s; gRPC %s",
            settings.base_model,
            ",".join(settings.inference_targets),
            settings.trainer_target,
            "mTLS" if tls else "plaintext",
        )
        try:
            yield
        finally:
            if hot_adapters is not None:
                await hot_adapters.close()
            await trainer.close()
            await pool.close()
            await app.state.authenticator.close()
            engine.dispose()

    app = GatewayApp(
        title="LoRA Fleet gateway",
        summary="OpenAI-compatible API for LoRA fine-tuning and multi-LoRA serving.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.limiter = limiter
    app.state.settings = settings
    install_error_handlers(app)
    routers = (chat_router, completions_router, models_router, files_router, fine_tuning_router, adapters_router)
    for router in (*routers, admin_router, adapters_admin_router):
        app.include_router(router, responses=ERROR_RESPONSES)
    app.include_router(ops_router)
    install_openapi(app)
    install_console(app)
    # Added last = outermost: metrics see every response, including the body limit's 413s.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes, file_limit=settings.max_file_bytes)
    app.add_middleware(MetricsMiddleware, metrics=gateway_metrics)
    # In front of all of it: the generation routes' valid requests (generation/fast_path.py).
    app.fast_path = partial(
        GenerationFastPath,
        routes=bind_routes(app, [CHAT_ROUTE, COMPLETIONS_ROUTE]),
        metrics=gateway_metrics,
        body_limit=settings.max_body_bytes,
    )
    return app
