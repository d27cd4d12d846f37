"""vLLM's processes exit with their replica, however the replica ends.

vLLM runs its engine core (and, on GPUs, one worker per device) in processes of
its own. When the replica's main process dies without shutting the engine down
(SIGKILL, the OOM killer, a crash), nothing tells them: they were seen running
on, holding the model and the KV cache, 15 s and more after a SIGKILL. In a
Kubernetes pod the whole container goes; under ``make up`` or systemd they are
orphans holding gigabytes.

So the replica names itself in the environment before it starts the engine, and
every process vLLM starts (they all load the ``vllm.general_plugins`` entry
point, see vllm_plugin.py) checks once a second that its parent is still the
process that started it; when it was re-parented, its parent died, and it exits.
The engine core exits when the replica dies, its workers when the engine core does.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)

REPLICA_PID_ENV = "LORAFLEET_INFERENCE_REPLICA_PID"
CHECK_INTERVAL_S = 1.0


def mark_replica_process() -> None:
    """Called by the replica before it starts vLLM: the processes vLLM starts inherit the mark."""
    os.environ[REPLICA_PID_ENV] = str(os.getpid())


def exit_with_parent() -> None:
    """In a process vLLM started for a replica: exit once the parent that started it is gone.

    Does nothing in the replica itself (vLLM loads plugins there too) or outside a replica (raw vLLM).
    """
    replica = os.environ.get(REPLICA_PID_ENV)
    if not replica or replica == str(os.getpid()):
        return
    parent = os.getppid()
    if parent == 1:  # the replica died before this process got here: re-parented to init already
        os._exit(1)
    threading.Thread(target=_watch, args=(parent,), name="lorafleet-exit-with-parent", daemon=True).start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(CHECK_INTERVAL_S)
    log.error("lorafleet: the process that started this one (pid %d) is gone; exiting", parent)
    os._exit(1)  # no cleanup to run: the replica that needed this process is dead
