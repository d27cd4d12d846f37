"""Process entry: build the trainer from settings, serve until SIGTERM/SIGINT, shut down cleanly.

On SIGTERM the health status goes NOT_SERVING, new jobs are refused, the
running worker is stopped and its job goes back to the queue (the next start
runs it again), in-flight RPCs get ``shutdown_grace_s``, then the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from lorafleet_common.logs import configure_logging
from lorafleet_common.store import ObjectStore
from lorafleet_trainer.grpc_server import TrainerGrpcServer
from lorafleet_trainer.jobstore import JobStore
from lorafleet_trainer.launch import build_launcher
from lorafleet_trainer.metrics import TrainerMetrics
from lorafleet_trainer.service import TrainerService
from lorafleet_trainer.settings import TrainerSettings

log = logging.getLogger(__name__)


class TrainerApp:
    """The trainer's parts, wired together; ``start``/``stop`` run them."""

    def __init__(
        self, settings: TrainerSettings, *, store: ObjectStore | None = None, registry: CollectorRegistry | None = None
    ) -> None:
        self.settings = settings
        self.jobs = JobStore(settings.resolved_database_url(), timeout_s=settings.store_call_timeout_s)
        self.metrics = TrainerMetrics(registry)
        self.service = TrainerService(
            settings, store or settings.open_store(), self.jobs, self.metrics, build_launcher(settings)
        )
        self.tls = settings.grpc_tls()
        self.grpc = TrainerGrpcServer(self.service, settings.host, settings.grpc_port, self.tls)
        self._metrics_server: Any = None

    @property
    def port(self) -> int:
        return self.grpc.port

    async def start(self) -> None:
        await self.grpc.start()
        await self.service.start()
        if self.settings.metrics_port:
            self._metrics_server, _ = start_http_server(
                self.settings.metrics_port, addr=self.settings.host, registry=self.metrics.registry
            )
        await self.grpc.set_serving(True)
        log.info("trainer serving gRPC%s on %s:%d", " (mTLS)" if self.tls else "", self.settings.host, self.port)

    async def stop(self) -> None:
        await self.grpc.set_serving(False)
        await self.service.stop()
        await self.grpc.stop(self.settings.shutdown_grace_s)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self.jobs.close()
        log.info("trainer stopped")


async def serve(settings: TrainerSettings) -> None:
    app = TrainerApp(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    await stop.wait()
    log.info("shutting down")
    await app.stop()


def main() -> None:
    settings = TrainerSettings()
    configure_logging(settings.log_level, "trainer")
    asyncio.run(serve(settings))
