"""Gateway worker processes (LORAFLEET_GATEWAY_WORKERS > 1): the supervisor, and what each worker needs from it.

One event loop uses one CPU core: a burst of streamed requests queues behind it (each costs 0.3-1.5 ms of CPU
before its first token). With ``workers`` > 1, ``python -m lorafleet_gateway`` becomes a supervisor that

- migrates the database once, so workers start on a migrated schema and never migrate themselves;
- starts ``workers`` fresh ``python -m lorafleet_gateway`` processes, told apart by WORKER_INDEX_ENV. Each binds
  a listening socket of its own on the port with SO_REUSEPORT, and the kernel spreads new connections over
  them. (With one shared socket, whichever worker wakes first can accept a whole burst.);
- gives them an empty prometheus_client multiprocess folder, so /metrics of any worker shows the whole gateway;
- restarts a worker that dies (its counters folded into the folder's archive files: totals stay, files do not pile
  up), and gives up (exit 1) when workers keep dying right after their start;
- on SIGTERM or SIGINT, has every worker drain its requests (uvicorn's graceful shutdown), then exits: 0 when
  each worker exited 0.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from uvicorn.config import STARTUP_FAILURE

from lorafleet_gateway.db.database import migrate, open_engine
from lorafleet_gateway.metrics import fold_dead_worker
from lorafleet_gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)

WORKER_INDEX_ENV = "LORAFLEET_GATEWAY_WORKER_INDEX"
SUPERVISOR_PID_ENV = "LORAFLEET_GATEWAY_SUPERVISOR_PID"
# prometheus_client picks its multiprocess mode when it is imported: a worker has it in its environment from start.
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Workers that keep dying this soon after their start (a port taken, a broken install) make the supervisor give up.
QUICK_DEATH_S = 5.0
# A worker's exit code when it could not start serving (the port cannot be bound, the app's startup failed): a
# death at start however long the start took, which on a loaded machine can be more than QUICK_DEATH_S. It is
# uvicorn's own code for a failed startup (since 0.50), so a failed lifespan startup gives it too.
CANNOT_START_EXIT = STARTUP_FAILURE
MAX_QUICK_DEATHS = 5
# Past graceful_shutdown_s: the lifespan's own shutdown (closing gRPC channels and the database) takes a moment.
KILL_MARGIN_S = 10.0
_POLL_S = 0.1
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class WorkerRole:
    """This process is worker ``index`` of ``count``, started by the supervisor ``supervisor_pid``."""

    index: int
    count: int
    metrics_dir: Path
    supervisor_pid: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str], settings: GatewaySettings) -> WorkerRole | None:
        """The role the supervisor gave this process in its environment; None for a gateway started directly."""
        if WORKER_INDEX_ENV not in environ:
            return None
        return cls(
            index=int(environ[WORKER_INDEX_ENV]),
            count=settings.workers,
            metrics_dir=Path(environ[METRICS_DIR_ENV]),
            supervisor_pid=int(environ[SUPERVISOR_PID_ENV]),
        )

    @property
    def plans_merges(self) -> bool:
        """Only worker 0 runs the hot-adapter planner: the replicas take merges from one planner per gateway."""
        return self.index == 0


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, so that every worker can bind the same port.

    Not listening yet: uvicorn listens (backlog 2048, its default) once the app has started, and the kernel
    sends connections only to listening sockets, so none waits on a worker that is still starting.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def follow_supervisor(supervisor_pid: int) -> None:
    """Have the kernel SIGTERM this worker (a graceful drain) if its supervisor dies, even by SIGKILL.

    Otherwise a killed supervisor would leave its workers serving the port with nobody to stop them. Linux only:
    elsewhere workers outlive a killed supervisor.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != supervisor_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def migrate_database(settings: GatewaySettings) -> None:
    engine = open_engine(settings.resolved_database_url(), timeout_s=settings.connect_timeout_s)
    try:
        migrate(engine)
    finally:
        engine.dispose()


def supervise(settings: GatewaySettings) -> int:
    """Run ``settings.workers`` workers until a signal stops them; the exit code for the supervisor."""
    try:
        migrate_database(settings)
    except Exception:
        logger.exception("gateway database migration failed; no worker started")
        return 1
    metrics_dir = Path(tempfile.mkdtemp(prefix="lorafleet-gateway-metrics-"))
    try:
        return Supervisor(settings, metrics_dir).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    started_at: float


def _describe_exit(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


class Supervisor:
    """Starts the workers, restarts those that die, and stops them all on SIGTERM or SIGINT."""

    def __init__(self, settings: GatewaySettings, metrics_dir: Path) -> None:
        self._settings = settings
        self._metrics_dir = metrics_dir
        self._workers: dict[int, _Worker] = {}
        self._stop_requested = False
        self._force_requested = False  # a second SIGINT: cut the drain short, as uvicorn does

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        logger.info(
            "gateway supervisor (pid %d): %d workers on %s:%d",
            os.getpid(),
            self._settings.workers,
            self._settings.host,
            self._settings.port,
        )
        for index in range(self._settings.workers):
            self._start(index)
        crashed = self._keep_running()
        return self._stop_all() or int(crashed)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Only flags: the loops forward them, so no worker started meanwhile can miss one.
        if self._stop_requested and signum == signal.SIGINT:
            self._force_requested = True
        self._stop_requested = True

    def _start(self, index: int) -> None:
        env = {
            **os.environ,
            WORKER_INDEX_ENV: str(index),
            SUPERVISOR_PID_ENV: str(os.getpid()),
            METRICS_DIR_ENV: str(self._metrics_dir),
        }
        process = subprocess.Popen([sys.executable, "-m", "lorafleet_gateway"], env=env, stdin=subprocess.DEVNULL)
        self._workers[index] = _Worker(index, process, time.monotonic())
        logger.info("gateway worker %d started (pid %d)", index, process.pid)

    def _keep_running(self) -> bool:
        """Restart workers that exit until a signal (False), or until workers keep dying at start (True)."""
        quick_deaths = 0
        while not self._stop_requested:
            for worker in list(self._workers.values()):
                code = worker.process.poll()
                if code is None:
                    continue
                lived_s = time.monotonic() - worker.started_at
                logger.error(
                    "gateway worker %d (pid %d) exited (%s) after %.1f s; restarting it",
                    worker.index,
                    worker.process.pid,
                    _describe_exit(code),
                    lived_s,
                )
                # Its live gauges (requests in flight...) leave the totals; its counters stay in them.
                fold_dead_worker(self._metrics_dir, worker.process.pid)
                at_start = lived_s < QUICK_DEATH_S or code == CANNOT_START_EXIT
                quick_deaths = quick_deaths + 1 if at_start else 0
                if quick_deaths >= MAX_QUICK_DEATHS:
                    logger.error(
                        "gateway workers died %d times in a row within %g s of their start: stopping the "
                        "gateway (see the workers' errors above)",
                        quick_deaths,
                        QUICK_DEATH_S,
                    )
                    return True
                self._start(worker.index)
            time.sleep(_POLL_S)
        return False

    def _stop_all(self) -> int:
        """SIGTERM every worker and wait for it to drain; SIGKILL those still running past the deadline."""
        for worker in self._workers.values():
            self._send(worker, signal.SIGTERM)
        deadline = time.monotonic() + self._settings.graceful_shutdown_s + KILL_MARGIN_S
        forced = False
        while self._running() and time.monotonic() < deadline:
            if self._force_requested and not forced:
                forced = True
                for worker in self._running():
                    self._send(worker, signal.SIGINT)  # uvicorn's second SIGINT: stop without waiting
            time.sleep(_POLL_S)
        for worker in self._running():
            logger.error("gateway worker %d (pid %d) did not stop in time: killed", worker.index, worker.process.pid)
            worker.process.kill()
        clean = True
        for worker in self._workers.values():
            try:
                code = worker.process.wait(timeout=10)  # killed or exited: only reaping is left
            except subprocess.TimeoutExpired:
                logger.error("gateway worker %d (pid %d) outlived SIGKILL", worker.index, worker.process.pid)
                clean = False
                continue
            # Killed by our SIGTERM before it set its handler: it was still starting and served nothing.
            if code not in (0, -signal.SIGTERM):
                logger.error("gateway worker %d (pid %d): %s", worker.index, worker.process.pid, _describe_exit(code))
                clean = False
        logger.info("gateway supervisor: all workers stopped")
        return 0 if clean else 1

    def _running(self) -> list[_Worker]:
        return [w for w in self._workers.values() if w.process.poll() is None]

    @staticmethod
    def _send(worker: _Worker, sig: signal.Signals) -> None:
        if worker.process.poll() is None:
            worker.process.send_signal(sig)
