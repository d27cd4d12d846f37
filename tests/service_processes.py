"""The services as real processes, started as operators start them: ``python -m lorafleet_<service>``.

Each runs in its own session (its own process group), so everything it starts (vLLM's engine core,
the trainer's job workers) can be found, measured and checked for leftovers by that group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from lorafleet_common.healthcheck import Unhealthy, check_grpc, check_http

MIB = 1024 * 1024


@dataclass
class ServiceProcess:
    """One running service: its process, its log file."""

    service: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def tree(self) -> list[psutil.Process]:
        """The process and everything it started that still runs: descendants and members of its group."""
        found: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.pid)
            found[root.pid] = root
            for child in root.children(recursive=True):
                found[child.pid] = child
        for proc in group_members(self.pid):
            found.setdefault(proc.pid, proc)
        return list(found.values())

    def rss_mib(self) -> dict[str, float]:
        """Resident memory (MiB) of the process ("main") and of everything it started ("tree")."""
        main = tree = 0.0
        for proc in self.tree():
            with contextlib.suppress(psutil.Error):
                rss = proc.memory_info().rss / MIB
                tree += rss
                if proc.pid == self.pid:
                    main = rss
        return {"main": main, "tree": tree}

    def wait_ready(self, probe: Callable[[], object], timeout_s: float) -> float:
        """Call ``probe`` until it stops raising Unhealthy; seconds it took. Fails with the log if the process dies."""
        started = time.monotonic()
        while True:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.service} exited ({self.popen.returncode}):\n{self.log_tail()}")
            try:
                probe()
                return time.monotonic() - started
            except Unhealthy:
                pass
            if time.monotonic() - started > timeout_s:
                raise AssertionError(f"{self.service} not ready after {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)

    def terminate(self, timeout_s: float) -> tuple[int | None, float]:
        """SIGTERM and wait up to ``timeout_s``: (exit code or None if it is still running, seconds waited)."""
        started = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL the whole group (cleanup after a failed test)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)


def start_service(service: str, env: dict[str, str], log_dir: Path) -> ServiceProcess:
    """``python -m lorafleet_<service>`` with ``env`` added to ours, in a new session, logging to a file."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{service}.log"
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", f"lorafleet_{service}"],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return ServiceProcess(service, popen, log_path)


def grpc_probe(port: int) -> Callable[[], object]:
    return lambda: check_grpc(f"127.0.0.1:{port}", timeout_s=2)


def http_probe(url: str) -> Callable[[], object]:
    return lambda: check_http(url, timeout_s=2)


def group_members(pgid: int) -> list[psutil.Process]:
    """Live processes (zombies excluded) whose process group is ``pgid``."""
    members = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
    return members


def group_left(pgid: int, timeout_s: float = 10.0) -> list[psutil.Process]:
    """``group_members`` once the group is empty, or what is still there after ``timeout_s``: a process that
    was sent SIGKILL runs on until the kernel has torn it down (vLLM's engine core: its large mappings)."""
    deadline = time.monotonic() + timeout_s
    while (members := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return members


def still_running(processes: Iterable[psutil.Process]) -> list[str]:
    """Those of ``processes`` (the same process: pid and start time) that still run, described."""
    left = []
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
    return left


def wait_gone(processes: Iterable[psutil.Process], timeout_s: float = 10.0) -> list[str]:
    """Wait up to ``timeout_s`` for ``processes`` to end; those still running, described.

    A stopped service's helpers may outlive it by a moment (multiprocessing's resource tracker cleans up
    after the last process holding its pipe exits): that is not a leak, one still there after the grace is.
    """
    processes = list(processes)
    deadline = time.monotonic() + timeout_s
    while (left := still_running(processes)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def descendants() -> set[int]:
    """Pids of this (test) process's live descendants."""
    return {p.pid for p in psutil.Process().children(recursive=True) if _live(p)}


def _live(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
