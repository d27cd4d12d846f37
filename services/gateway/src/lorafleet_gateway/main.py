"""Entry point: settings -> logging -> uvicorn serving create_app, with graceful shutdown on SIGTERM.

With LORAFLEET_GATEWAY_WORKERS > 1 this process supervises that many worker processes instead (workers.py),
each of them this same entry point in the role the supervisor gave it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from functools import partial
from types import FrameType

import uvicorn
from pydantic import ValidationError

from lorafleet_common.gc_heap import freeze_startup_heap
from lorafleet_common.logs import configure_logging
from lorafleet_gateway.app import create_app
from lorafleet_gateway.settings import GatewaySettings
from lorafleet_gateway.workers import CANNOT_START_EXIT, WorkerRole, follow_supervisor, reuse_port_socket, supervise

logger = logging.getLogger(__name__)

ADMIN_KEY_ENV = "LORAFLEET_ADMIN_KEY"


def load_settings() -> GatewaySettings:
    """GatewaySettings from the environment, or exit 2 with a message naming what is wrong."""
    try:
        return GatewaySettings()  # type: ignore[call-arg]  # admin_key comes from the environment
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            if field in (ADMIN_KEY_ENV, "admin_key"):
                lines.append(
                    f"{ADMIN_KEY_ENV} is not set (or blank): the gateway refuses to start without an admin key. "
                    "Set it to a long random secret; clients send it as 'Authorization: Bearer <key>'."
                )
            else:
                message = str(error["msg"]).removeprefix("Value error, ")
                lines.append(f"{field}: {message}" if field else message)  # model-level checks name no field
        print("lorafleet-gateway: invalid configuration:\n  " + "\n  ".join(lines), file=sys.stderr)
        raise SystemExit(2) from None


def uvicorn_config(settings: GatewaySettings, worker: WorkerRole | None = None) -> uvicorn.Config:
    return uvicorn.Config(
        partial(create_app, settings, worker=worker),
        factory=True,
        host=settings.host,
        port=settings.port,
        # Both are dependencies of this package, named so that a broken install fails here: "auto" would quietly
        # fall back to asyncio's loop and the pure-Python h11 parser, ~30% more CPU per request and per streamed
        # event (docs/benchmarks.md).
        loop="uvloop",
        http="httptools",
        log_config=None,  # keep the logging configure_logging set up
        log_level=settings.log_level.lower(),
        access_log=settings.access_log,
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
        proxy_headers=False,
    )


def main() -> None:
    settings = load_settings()
    worker = WorkerRole.from_env(os.environ, settings)
    configure_logging(settings.log_level, "gateway" if worker is None else f"gateway[{worker.index}]")
    if worker is None and settings.workers > 1:
        raise SystemExit(supervise(settings))
    serve(settings, worker)


class Server(uvicorn.Server):
    """uvicorn's server that, once the app has started (lifespan done, socket listening), freezes the heap built so
    far for the garbage collector: full collections then stop stalling every stream in flight (gc_heap.py)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            freeze_startup_heap(logger)


def serve(settings: GatewaySettings, worker: WorkerRole | None) -> None:
    """Serve until SIGTERM: the whole gateway in this process, or one worker's share of it."""
    config = uvicorn_config(settings, worker)
    # uvicorn handles SIGTERM/SIGINT: stop accepting, let in-flight requests finish, then run the lifespan exit.
    server = Server(config)

    # Once drained, uvicorn restores the handler it found and raises the signal again, so with the default
    # handler a clean drain ends as "killed by SIGTERM" (exit -15/143), which supervisors and tests cannot tell
    # from a kill mid-request. This handler makes the re-raised SIGTERM a no-op: a drained gateway exits 0. It
    # also covers a SIGTERM before uvicorn installs its own: the server then stops as soon as it has started.
    def stop(_signum: int, _frame: FrameType | None) -> None:
        server.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    if worker is None:
        server.run()
        return
    # A worker gets SIGINT too when Ctrl-C reaches the terminal's process group: it drains as for SIGTERM.
    signal.signal(signal.SIGINT, stop)
    follow_supervisor(worker.supervisor_pid)
    try:
        sock = reuse_port_socket(settings.host, settings.port)
    except OSError as exc:
        logger.error("gateway worker %d cannot bind %s:%d: %s", worker.index, settings.host, settings.port, exc)
        raise SystemExit(CANNOT_START_EXIT) from None
    # When the app's startup fails, uvicorn (>=0.50) itself exits with the same code, CANNOT_START_EXIT.
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
