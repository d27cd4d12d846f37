"""How a job's worker is started, watched and stopped: the scheduler's only view of it.

A launcher turns a ``WorkerSpec`` into a running worker and hands back a
``Worker``: the worker's event lines (JSON, see protocol.py), its exit code, and a
way to signal it. ``LocalLauncher`` runs the worker as a child process on this
host, in its own session so a signal reaches every process it started; a job that
asks for several devices (``resources.devices``) runs under torchrun, one process per
device (distributed.py). Other
launchers (a Kubernetes Job, see launch_k8s.py) keep the same contract, so the
scheduler's queue, cancel, shutdown and resume logic is the same everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from lorafleet_trainer.manifest import JobManifest
from lorafleet_trainer.protocol import LOG_FILE, SPEC_FILE, WorkerSpec, write_spec
from lorafleet_trainer.settings import TrainerSettings


class Worker(Protocol):
    """One running job worker, wherever it runs."""

    def lines(self) -> AsyncIterator[bytes]:
        """The worker's report, one event per line, until it exits."""
        ...

    async def wait(self) -> int:
        """Its exit code (once every line was read)."""
        ...

    @property
    def exited(self) -> bool: ...

    async def signal(self, sig: signal.Signals) -> None:
        """SIGTERM: stop soon, saving what can be saved; SIGKILL: stop now."""
        ...

    def kill_now(self) -> None:
        """Synchronous last resort when the scheduler itself is being torn down."""
        ...

    async def close(self) -> None:
        """Release what the launch created (spec file, scratch space, cluster objects)."""
        ...

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of the worker's log, for a failure message ("" when there is none)."""
        ...


class Launcher(Protocol):
    async def launch(self, spec: WorkerSpec, job_dir: Path) -> Worker: ...


class LocalWorker:
    """A worker process group on this host."""

    def __init__(self, process: asyncio.subprocess.Process, job_dir: Path) -> None:
        self.process = process
        self.job_dir = job_dir

    @property
    def pid(self) -> int:
        return self.process.pid

    async def lines(self) -> AsyncIterator[bytes]:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            yield line

    async def wait(self) -> int:
        return await self.process.wait()

    @property
    def exited(self) -> bool:
        return self.process.returncode is not None

    async def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def kill_now(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    async def close(self) -> None:
        (self.job_dir / SPEC_FILE).unlink(missing_ok=True)  # it holds the S3 secret
        shutil.rmtree(self.job_dir / "adapter", ignore_errors=True)  # the store has it now (or it is incomplete)

    def log_tail(self, lines: int = 5) -> str:
        return log_tail(self.job_dir / LOG_FILE, lines)


class LocalLauncher:
    """Runs ``python -m lorafleet_trainer.worker <job-dir>`` as a child process in a new session.

    With ``resources.devices: N > 1`` the child is torchrun, which starts N worker ranks. torchrun puts
    each rank in a session of its own, so a signal to the job's process group reaches torchrun only:
    it forwards a SIGTERM to every rank, and each rank dies with torchrun on a SIGKILL
    (``distributed.die_with_parent``).
    """

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python

    def command(self, spec: WorkerSpec, job_dir: Path) -> list[str]:
        return worker_command(self.python, requested_devices(spec.manifest), job_dir)

    async def launch(self, spec: WorkerSpec, job_dir: Path) -> Worker:
        shutil.rmtree(job_dir / "adapter", ignore_errors=True)
        write_spec(job_dir, spec)
        with (job_dir / LOG_FILE).open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                *self.command(spec, job_dir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                start_new_session=True,
            )
        return LocalWorker(process, job_dir)


def requested_devices(manifest: dict[str, Any]) -> int:
    """How many worker processes the job's manifest asks for (1 when it does not parse: the worker reports why)."""
    try:
        return JobManifest.model_validate(manifest).resources.devices
    except ValidationError:
        return 1


def worker_command(python: str, devices: int, job_dir: Path | str) -> list[str]:
    """The command that runs a job's worker: itself for one device, torchrun on this host for several."""
    worker = ["-m", "lorafleet_trainer.worker", str(job_dir)]
    if devices <= 1:
        return [python, *worker]
    torchrun = [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",  # one host: a private rendezvous on a free local port
        "--nnodes=1",
        f"--nproc-per-node={devices}",
        "--max-restarts=0",  # a failed rank fails the job: the scheduler's resume path restarts it
        f"--log-dir={Path(job_dir) / 'torchrun'}",  # its scratch files stay in the job's folder, not /tmp
    ]
    return [*torchrun, *worker]


def build_launcher(settings: TrainerSettings) -> Launcher:
    """The launcher the settings name (the Kubernetes client is imported only when it is used)."""
    if settings.launcher == "kubernetes":
        from lorafleet_trainer.launch_k8s import KubernetesLauncher

        return KubernetesLauncher.from_settings(settings)
    return LocalLauncher()


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return format_tail(text, lines)


def format_tail(text: list[str], lines: int = 5) -> str:
    tail = " | ".join(line.strip() for line in text[-lines:] if line.strip())
    return f"Last log lines: {tail}" if tail else ""
