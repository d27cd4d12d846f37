"""Resumable training checkpoints in the trainer's object store.

One job's checkpoints::

    checkpoints/<job_id>/step-<n>/adapter.safetensors   the trainable (LoRA) weights
    checkpoints/<job_id>/step-<n>/optimizer.pt          AdamW's state_dict
    checkpoints/<job_id>/step-<n>/rng.pt                torch CPU (and CUDA) generator states, of every rank
    checkpoints/<job_id>/step-<n>/state.json            step, data position, batch-planner RNG, tokens, loss history
    checkpoints/<job_id>/LATEST                         "step-<n>", written last

A checkpoint exists once LATEST names it: a save cut short leaves files LATEST does not name, and
they are never read (the next save or prune removes them). Only the newest ``keep`` are kept.

``torch.save`` is used only for the optimizer and RNG state this trainer wrote itself, under a
job-scoped prefix of its own store; they are read back with ``torch.load(weights_only=True)``, which
unpickles tensors and plain containers only, so even a tampered file cannot run code. The weights
are safetensors. Nothing here imports torch at module level: the scheduler (torch-free) deletes
checkpoints through this module.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorafleet_common.store import ObjectNotFound, ObjectStore, StoreError

if TYPE_CHECKING:
    import torch

CHECKPOINTS_PREFIX = "checkpoints"
POINTER = "LATEST"
ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "state.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointUnusable(Exception):
    """A checkpoint exists but cannot be resumed from (missing or unreadable files, another job's data)."""


@dataclass
class LoopState:
    """Where ``train_loop.train`` stands between two optimizer steps: all it needs to go on exactly.

    ``epoch``'s batch plan is rebuilt from ``planner_state`` (the planner RNG's state when that epoch was
    planned); ``group`` is the index of the next optimizer-step group in it (it may equal the number of
    groups: the epoch is done and the next one is planned from the RNG as rebuilding left it).
    ``torch_rng`` and ``cuda_rng`` are rank 0's; ``other_ranks_rng`` holds ranks 1.. of a data parallel run
    (``{"cpu": tensor, "cuda": [tensor]}`` each), so each rank's dropout draws continue where they stopped.
    """

    step: int
    epoch: int
    group: int
    planner_state: tuple[Any, ...]
    plan_digest: str
    trained_tokens: int
    train_seconds: float
    optimizer: dict[str, Any]
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] = field(default_factory=list)
    other_ranks_rng: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Checkpoint:
    """A LoopState plus what the worker needs around it: the weights, the loss history, the data fingerprint."""

    loop: LoopState
    adapter: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    fingerprint: str
    uri: str = ""


def job_prefix(job_id: str) -> str:
    return f"{CHECKPOINTS_PREFIX}/{job_id}"


def step_prefix(job_id: str, step: int) -> str:
    return f"{job_prefix(job_id)}/step-{step}"


def checkpoint_due(step: int, every_steps: int, every_minutes: float, seconds_since_last: float) -> bool:
    """Every ``every_steps`` optimizer steps (counted from the start) or ``every_minutes`` since the last one."""
    by_steps = every_steps > 0 and step % every_steps == 0
    by_time = every_minutes > 0 and seconds_since_last >= every_minutes * 60
    return by_steps or by_time


def data_fingerprint(*parts: Any) -> str:
    """A digest of what decides the batch plan (manifest, dataset hashes, token lengths): a checkpoint of
    other data is not resumed."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _torch_bytes(obj: Any) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _torch_load(data: bytes) -> Any:
    import torch

    # weights_only: tensors and plain containers only (see the module docstring).
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def save_checkpoint(store: ObjectStore, job_id: str, checkpoint: Checkpoint, keep: int) -> str:
    """Write a checkpoint, point LATEST at it, prune to the newest ``keep``; return its URI."""
    from safetensors.torch import save as save_safetensors

    loop = checkpoint.loop
    prefix = step_prefix(job_id, loop.step)
    weights = {name: t.detach().to("cpu").contiguous() for name, t in checkpoint.adapter.items()}
    store.put(f"{prefix}/{ADAPTER_FILE}", save_safetensors(weights))
    store.put(f"{prefix}/{OPTIMIZER_FILE}", _torch_bytes(loop.optimizer))
    rng = {"cpu": loop.torch_rng, "cuda": list(loop.cuda_rng), "ranks": list(loop.other_ranks_rng)}
    store.put(f"{prefix}/{RNG_FILE}", _torch_bytes(rng))
    state = {
        "format": FORMAT_VERSION,
        "step": loop.step,
        "epoch": loop.epoch,
        "group": loop.group,
        "planner_state": loop.planner_state,
        "plan_digest": loop.plan_digest,
        "trained_tokens": loop.trained_tokens,
        "train_seconds": loop.train_seconds,
        "fingerprint": checkpoint.fingerprint,
        "history": checkpoint.history,
    }
    store.put(f"{prefix}/{STATE_FILE}", json.dumps(state).encode())
    store.put(f"{job_prefix(job_id)}/{POINTER}", f"step-{loop.step}".encode())  # the commit: last
    prune_checkpoints(store, job_id, keep)
    return store.uri(prefix)


def _steps_on_store(store: ObjectStore, job_id: str) -> dict[int, list[str]]:
    """Every step folder under the job's prefix (complete or not) and its keys."""
    found: dict[int, list[str]] = {}
    base = job_prefix(job_id) + "/"
    for key in store.list(base):
        folder, _, _ = key[len(base) :].partition("/")
        match = _STEP_DIR.fullmatch(folder)
        if match and key != base + folder:
            found.setdefault(int(match.group(1)), []).append(key)
    return found


def latest_step(store: ObjectStore, job_id: str) -> int | None:
    """The step LATEST names; None when there is no committed checkpoint."""
    try:
        text = store.get(f"{job_prefix(job_id)}/{POINTER}").decode(errors="replace").strip()
    except ObjectNotFound:
        return None
    match = _STEP_DIR.fullmatch(text)
    if match is None:
        raise CheckpointUnusable(f"{store.uri(job_prefix(job_id) + '/' + POINTER)} names no checkpoint: {text!r}")
    return int(match.group(1))


def prune_checkpoints(store: ObjectStore, job_id: str, keep: int) -> list[int]:
    """Keep the committed checkpoint and the ``keep - 1`` before it; delete the rest (leftovers of cut-short
    saves included). Returns the steps deleted."""
    latest = latest_step(store, job_id)
    steps = _steps_on_store(store, job_id)
    kept = [] if latest is None else sorted(s for s in steps if s <= latest)[-max(keep, 1) :]
    gone = sorted(s for s in steps if s not in kept)
    for step in gone:
        for key in steps[step]:
            store.delete(key)
    return gone


def discard_checkpoints(store: ObjectStore, job_id: str) -> int:
    """Delete every checkpoint of the job, LATEST first so nothing reads a half-deleted one; the number of
    objects deleted."""
    keys = store.list(job_prefix(job_id) + "/")
    pointer = f"{job_prefix(job_id)}/{POINTER}"
    for key in sorted(keys, key=lambda k: k != pointer):
        store.delete(key)
    return len(keys)


def load_latest_checkpoint(store: ObjectStore, job_id: str) -> Checkpoint | None:
    """The checkpoint LATEST names; None without one; CheckpointUnusable when it cannot be read back.

    StoreError other than a missing object propagates: an unreachable store says nothing about the checkpoint.
    """
    step = latest_step(store, job_id)
    if step is None:
        return None
    from safetensors.torch import load as load_safetensors

    prefix = step_prefix(job_id, step)
    try:
        state = json.loads(store.get(f"{prefix}/{STATE_FILE}"))
        adapter = load_safetensors(store.get(f"{prefix}/{ADAPTER_FILE}"))
        optimizer = _torch_load(store.get(f"{prefix}/{OPTIMIZER_FILE}"))
        rng = _torch_load(store.get(f"{prefix}/{RNG_FILE}"))
        if state.get("format") != FORMAT_VERSION or state.get("step") != step:
            raise ValueError(f"format {state.get('format')!r} step {state.get('step')!r}, want {FORMAT_VERSION} {step}")
        version, internal, gauss = state["planner_state"]
        loop = LoopState(
            step=step,
            epoch=int(state["epoch"]),
            group=int(state["group"]),
            planner_state=(version, tuple(internal), gauss),  # random.Random.setstate wants tuples, JSON gave lists
            plan_digest=str(state["plan_digest"]),
            trained_tokens=int(state["trained_tokens"]),
            train_seconds=float(state["train_seconds"]),
            optimizer=optimizer,
            torch_rng=rng["cpu"],
            cuda_rng=list(rng.get("cuda") or []),
            other_ranks_rng=list(rng.get("ranks") or []),
        )
        history = [dict(record) for record in state["history"]]
        fingerprint = str(state["fingerprint"])
    except ObjectNotFound as exc:
        raise CheckpointUnusable(f"checkpoint {store.uri(prefix)} is incomplete: {exc} is missing") from exc
    except StoreError:
        raise
    except Exception as exc:  # json, safetensors, torch.load and shape errors alike: the files are not ours
        raise CheckpointUnusable(f"checkpoint {store.uri(prefix)} is unreadable: {type(exc).__name__}: {exc}") from exc
    return Checkpoint(loop, adapter, history, fingerprint, store.uri(prefix))


def adapter_weights(model: Any) -> dict[str, torch.Tensor]:
    """The trainable parameters by name: the LoRA weights a checkpoint holds."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def restore_adapter(model: Any, weights: dict[str, torch.Tensor]) -> None:
    """Copy checkpointed weights into the model's trainable parameters; CheckpointUnusable if they do not fit."""
    import torch

    params = adapter_weights(model)
    if set(params) != set(weights):
        missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        raise CheckpointUnusable(
            f"the checkpoint's weights do not fit the model (missing {missing[:3]}, extra {extra[:3]})"
        )
    for name, param in params.items():
        if param.shape != weights[name].shape:
            shape = tuple(weights[name].shape)
            raise CheckpointUnusable(
                f"weight {name}: shape {shape} in the checkpoint, {tuple(param.shape)} in the model"
            )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name].to(param.device, param.dtype))
