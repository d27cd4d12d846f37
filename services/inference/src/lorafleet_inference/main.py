"""Entry point: settings -> logging -> base model -> gRPC server (NOT_SERVING) -> engine -> pinned adapters
-> SERVING.

Adapters need no restore step after a restart: every published adapter resolves from the
object store on its first request (the disk tier usually still holds a validated copy).

On SIGTERM/SIGINT: health NOT_SERVING, new Generate calls get UNAVAILABLE,
in-flight streams may finish for up to drain_timeout_s; those still running
then end with UNAVAILABLE naming the deadline; the server stops and the engine
shuts down.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from dataclasses import dataclass, field
from typing import Any

from grpc_health.v1 import health

from lorafleet_common.embedded_model import resolve_base_model
from lorafleet_common.gc_heap import freeze_startup_heap
from lorafleet_common.logs import configure_logging
from lorafleet_common.store import ObjectStore
from lorafleet_inference.adapters import AdapterManager
from lorafleet_inference.engine import Engine, start_engine
from lorafleet_inference.grpc_server import InferenceServicer, build_server, set_serving
from lorafleet_inference.merge import MergePolicy
from lorafleet_inference.metrics import InferenceMetrics, serve_metrics
from lorafleet_inference.prompts import PromptRenderer
from lorafleet_inference.service import InferenceService
from lorafleet_inference.settings import InferenceSettings

log = logging.getLogger(__name__)

ENGINE_CHECK_INTERVAL_S = 10.0
ENGINE_CHECK_TIMEOUT_S = 10.0
CUT_WAIT_S = 5.0


@dataclass
class InferenceApp:
    """A running replica: its server, engine and service; ``stop`` drains and shuts everything down."""

    settings: InferenceSettings
    server: Any  # grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    servicer: InferenceServicer
    metrics: InferenceMetrics
    engine: Engine | None = None
    service: InferenceService | None = None
    metrics_server: Any = None
    engine_failed: asyncio.Event = field(default_factory=asyncio.Event)
    _watchdog: asyncio.Task[None] | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    def start_watchdog(self, engine: Engine, interval_s: float = ENGINE_CHECK_INTERVAL_S) -> None:
        self._watchdog = asyncio.ensure_future(self._watch_engine(engine, interval_s))

    async def _watch_engine(self, engine: Engine, interval_s: float) -> None:
        """A dead engine turns health NOT_SERVING (so orchestrators restart the replica) and ends serve()."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.wait_for(engine.check_health(), ENGINE_CHECK_TIMEOUT_S)
            except Exception:
                log.exception("the engine is dead")
                await set_serving(self.health, False)
                self.engine_failed.set()
                return

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop admitting, let in-flight requests finish (bounded), stop the server, shut the engine down."""
        if self._stopped:
            return
        self._stopped = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        timeout = self.settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        await set_serving(self.health, False)
        if self.service is not None:
            self.service.begin_drain()
            if not await self.service.wait_idle(timeout):
                reason = f"this replica is shutting down: its drain deadline ({timeout:.0f} s) passed before the end"
                cut = await self.service.cut_in_flight(reason)
                log.warning("drain timeout (%.0f s) passed with requests in flight; %d cut", timeout, cut)
                # Let the cut requests send their status before the server stops (and cancels whatever is left).
                await self.service.wait_idle(CUT_WAIT_S)
        await self.server.stop(grace=1.0)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        if self.engine is not None:
            self.engine.shutdown()
        log.info("inference stopped")


def build_service(
    settings: InferenceSettings,
    engine: Engine,
    renderer: PromptRenderer,
    store: ObjectStore,
    metrics: InferenceMetrics,
    *,
    first_lora_id: int = 1,
) -> InferenceService:
    """The service over an engine (``first_lora_id`` lets several managers share one engine, e.g. in tests)."""
    adapters = AdapterManager(
        store,
        engine,
        cache_dir=settings.adapter_cache_path,
        base_model=settings.base_model,
        max_rank=settings.max_lora_rank,
        capacity=settings.max_cpu_loras,
        gpu_slots=settings.max_loras,
        disk_budget_bytes=settings.adapter_disk_cache_bytes,
        store_timeout_s=settings.store_timeout_s,
        load_timeout_s=settings.load_timeout_s,
        latest_ttl_s=settings.latest_ttl_s,
        metrics=metrics,
        first_lora_id=first_lora_id,
    )
    return InferenceService(
        engine,
        adapters,
        renderer,
        served_model=settings.served_model_name,
        max_model_len=settings.max_model_len,
        max_lora_rank=settings.max_lora_rank,
        max_choices=settings.max_choices,
        max_logprobs=settings.max_logprobs,
        metrics=metrics,
        merge=MergePolicy(
            enabled=settings.merge_enabled,
            min_hold_s=settings.merge_min_hold_s,
            drain_timeout_s=settings.merge_drain_timeout_s,
            weights_timeout_s=settings.load_timeout_s,
        ),
    )


async def start(settings: InferenceSettings, model_path: str | None = None) -> InferenceApp:
    """Start a replica: the server answers at once (NOT_SERVING), SERVING once the engine is up."""
    metrics = InferenceMetrics()
    health_servicer = health.aio.HealthServicer()
    servicer = InferenceServicer()
    tls = settings.grpc_tls()
    server, port = build_server(servicer, health_servicer, settings.host, settings.grpc_port, tls)
    app = InferenceApp(settings, server, port, health_servicer, servicer, metrics)
    await set_serving(health_servicer, False)
    await server.start()
    log.info("gRPC%s on %s:%d (NOT_SERVING until the engine is up)", " (mTLS)" if tls else "", settings.host, port)
    try:
        if settings.metrics_port:
            app.metrics_server = serve_metrics(metrics, settings.host, settings.metrics_port)
        if model_path is None:
            model_path = await asyncio.to_thread(
                resolve_base_model, settings.base_model, settings.model_cache_dir, settings.s3_config()
            )
        store = settings.open_store()
        renderer = await asyncio.to_thread(PromptRenderer.from_pretrained, model_path)
        app.engine = await start_engine(settings, model_path, metrics)
        app.service = build_service(settings, app.engine, renderer, store, metrics)
        await app.service.adapters.preload(settings.pinned_adapters)
    except BaseException:
        await app.stop(drain_timeout_s=0)
        raise
    servicer.service = app.service
    await set_serving(health_servicer, True)
    app.start_watchdog(app.engine)
    log.info("inference SERVING %s on %s:%d", settings.served_model_name, settings.host, port)
    return app


async def serve(settings: InferenceSettings) -> None:
    """Run until SIGTERM/SIGINT, then drain and stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.ensure_future(start(settings))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # a signal while the engine starts: give up (start() cleans up after itself)
        log.info("signal received during start-up; stopping")
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        return
    app = starting.result()
    freeze_startup_heap(log)  # here, not in start(): tests start replicas in their own process
    failed = asyncio.ensure_future(app.engine_failed.wait())
    await asyncio.wait({stopping, failed}, return_when=asyncio.FIRST_COMPLETED)
    if failed.done():
        await app.stop(drain_timeout_s=0)
        raise SystemExit("the vLLM engine died; exiting so the replica is restarted")
    failed.cancel()
    log.info("signal received: draining for up to %.0f s", settings.drain_timeout_s)
    await app.stop()


def main() -> None:
    settings = InferenceSettings()
    configure_logging(settings.log_level, "inference")
    asyncio.run(serve(settings))
    # Collect the (already shut down) engine while modules are intact: AsyncLLM.__del__ calls shutdown()
    # again, which fails noisily if it only runs during interpreter teardown. Frozen objects are never collected.
    gc.unfreeze()
    gc.collect()


if __name__ == "__main__":
    main()
