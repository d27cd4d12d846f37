"""Data parallel training on one host: one worker process per device, started by torchrun.

For a manifest with ``resources.devices: N > 1`` the launcher starts ``python -m torch.distributed.run
--standalone --nproc-per-node N -m lorafleet_trainer.worker <job-dir>`` (launch.py); torchrun gives each
process RANK, WORLD_SIZE and LOCAL_RANK. Every rank reads the same spec and data and plans the same
batches; each optimizer step's micro-batches are dealt out round-robin, and the LoRA gradients are summed
across the ranks once per step, scaled by the step's global trained-token count (train_loop.py): the loss
and the weights are a single process's, whatever N. Rank 0 alone reports events, checkpoints and publishes.

``Ranks()`` (one process) makes every collective here a no-op, so the loop has one code path.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

# Rank 0 alone evaluates, writes checkpoints to the object store and publishes while the other ranks wait
# in the next collective: torch's default (10 to 30 minutes) could expire on a large validation set or a
# slow store. A rank that dies does not make the others wait this long: torchrun stops them all.
COLLECTIVE_TIMEOUT = timedelta(hours=2)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Ranks:
    """This process's place among the job's worker processes (rank 0 of 1 without torchrun)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self._device: torch.device | None = None

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> Ranks:
        """The ranks torchrun describes in the environment; a single process when torchrun did not start it."""
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env:
            return cls()
        rank = int(env["RANK"])
        return cls(rank, int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", rank)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def __repr__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    def device(self, kind: torch.device) -> torch.device:
        """The device this rank trains on: GPU ``LOCAL_RANK`` on CUDA (one GPU per rank), else ``kind``."""
        import torch

        if kind.type == "cuda" and self.distributed:
            return torch.device("cuda", self.local_rank)
        return kind

    def start(self, device: torch.device) -> str:
        """Join the job's process group (NCCL on CUDA, gloo on CPU) and wait for every rank; the backend's name."""
        if not self.distributed:
            return ""
        import torch
        import torch.distributed as dist

        self._device = device
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend, timeout=COLLECTIVE_TIMEOUT, device_id=device if device.type == "cuda" else None
        )
        dist.barrier()  # every rank is up (and has read the spec): the caller may delete it now
        return backend

    def stop(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def first_error(self, error: str | None) -> str | None:
        """Every rank's view of a phase that may have failed on some: the first failing rank's reason, or None."""
        if not self.distributed:
            return error
        import torch.distributed as dist

        errors: list[str | None] = [None] * self.world_size
        dist.all_gather_object(errors, error)
        for rank, reason in enumerate(errors):
            if reason:
                return reason if rank == 0 else f"rank {rank} of {self.world_size}: {reason}"
        return None

    def from_main(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (the others' are ignored): for decisions only rank 0 takes."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box: list[Any] = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def copy_from_main(self, params: list[torch.Tensor]) -> None:
        """Overwrite every rank's ``params`` with rank 0's, so the replicas start identical."""
        if not self.distributed or not params:
            return
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params])
            dist.broadcast(flat, src=0)
            offset = 0
            for p in params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Replace every parameter's gradient by its sum over the ranks, in one flat all-reduce.

        A rank with no micro-batch in the step (a last, short step) has no gradient: it adds zeros.
        """
        if not self.distributed or not params:
            return
        import torch
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()

    def sum(self, values: list[float]) -> list[float]:
        return self._reduce(values, "sum")

    def max(self, values: list[float]) -> list[float]:
        return self._reduce(values, "max")

    def _reduce(self, values: list[float], how: str) -> list[float]:
        if not self.distributed:
            return values
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self._device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if how == "sum" else dist.ReduceOp.MAX)
        return [float(v) for v in tensor.tolist()]

    def rng_states(self, device: torch.device) -> list[dict[str, Any]]:
        """Every rank's torch RNG state (CPU, and CUDA on a GPU), in rank order: LoRA dropout draws per rank."""
        import torch

        mine = {
            "cpu": torch.get_rng_state(),
            "cuda": list(torch.cuda.get_rng_state_all()) if device.type == "cuda" else [],
        }
        if not self.distributed:
            return [mine]
        import torch.distributed as dist

        states: list[Any] = [None] * self.world_size
        dist.all_gather_object(states, mine)
        return states


def devices_problem(devices: int, world_size: int, cuda_devices: int, cpus: int) -> str | None:
    """Why this host cannot run a job asking for ``devices`` processes, or None."""
    if world_size != devices:
        return (
            f"resources.devices is {devices} but the job's worker was started as {world_size} process(es): "
            "this launcher does not start torchrun for it"
        )
    if cuda_devices > 0:
        if devices > cuda_devices:
            return (
                f"resources.devices: {devices} GPUs asked for, but this trainer host has {cuda_devices} "
                f"visible CUDA device(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
            )
        return None
    if devices > cpus:
        return (
            f"resources.devices: {devices} processes asked for, but this trainer host has no CUDA GPU and "
            f"{cpus} CPU(s): on a CPU each process needs one"
        )
    return None


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def die_with_parent() -> None:
    """SIGKILL this rank when torchrun dies (Linux).

    torchrun starts each rank in a session of its own, so killing the job's process group (a cancel past
    its grace period, a trainer being torn down) reaches torchrun but not the ranks: without this they
    would train on, orphaned. A SIGTERM is forwarded by torchrun itself.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this rank may outlive torchrun", ctypes.get_errno())
    if os.getppid() != parent or parent == 1:  # torchrun died before the prctl took effect
        os._exit(1)
