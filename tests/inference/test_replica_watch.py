"""vLLM's processes exit when their replica dies without stopping them (replica_watch.py); a fleet-level check
is tests/e2e/test_faults_serving.py::test_replica_killed_mid_stream."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lorafleet_inference.replica_watch import REPLICA_PID_ENV

# The replica: marks itself, starts a "vLLM process" that runs the plugin's check, prints its pid, waits.
REPLICA = """
import subprocess, sys, time
from lorafleet_inference.replica_watch import mark_replica_process
{mark}
child = subprocess.Popen([sys.executable, "-c", {engine!r}])
print(child.pid, flush=True)
time.sleep(120)
"""
# What vllm_plugin.register does first in every process vLLM starts (the e2e test runs it in real vLLM processes).
ENGINE = (
    "from lorafleet_inference.replica_watch import exit_with_parent; exit_with_parent(); "
    "print('watching', flush=True); import time; time.sleep(120)"
)


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def start_replica(mark: bool) -> tuple[subprocess.Popen[str], int]:
    code = REPLICA.format(mark="mark_replica_process()" if mark else "", engine=ENGINE)
    # Not this process's mark: an inference service started in-process by an earlier test leaves it in os.environ.
    env = {k: v for k, v in os.environ.items() if k != REPLICA_PID_ENV}
    replica = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert replica.stdout is not None
    engine = int(replica.stdout.readline())
    assert replica.stdout.readline().strip() == "watching"  # the engine's plugin ran: it watches its parent
    return replica, engine


def test_vllm_processes_exit_when_their_replica_is_killed() -> None:
    replica, engine = start_replica(mark=True)
    assert running(engine)
    replica.send_signal(signal.SIGKILL)
    replica.wait(10)
    killed = time.monotonic()
    while running(engine) and time.monotonic() - killed < 10:
        time.sleep(0.1)
    assert not running(engine), "the engine process outlived its replica"
    assert time.monotonic() - killed < 5  # checked once a second


def test_processes_outside_a_replica_are_left_alone() -> None:
    replica, engine = start_replica(mark=False)
    try:
        replica.send_signal(signal.SIGKILL)
        replica.wait(10)
        time.sleep(2.5)
        assert running(engine), "raw vLLM (no replica mark) must not be touched"
    finally:
        os.kill(engine, signal.SIGKILL)
