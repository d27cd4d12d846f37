"""A micro-batch's host-side bookkeeping and its copy to the device, without making the host wait for the device.

On CUDA every read of a device tensor's value by Python (``.item()``, ``float()``, a boolean mask's ``nonzero``)
and every copy from pageable host memory blocks the host until the device has finished all queued work: the GPU
then idles while the host prepares and launches the next kernels. The labelled positions are known to the host
when it builds the batch, so they are computed here, on the host's tensors, and travel with the batch; the
tensors go to the device from pinned memory, asynchronously (the caching host allocator keeps each pinned
buffer until its copy has run).
"""

from __future__ import annotations

from typing import Any

import torch

from lorafleet_trainer.tokenize import IGNORE_INDEX

# Values the model code reads on the host: they stay Python numbers, never device tensors.
HOST_KEYS = frozenset({"max_seq_len"})


def label_selection(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``label_positions``: the flat (row x width) indices of the positions whose next token carries a label;
    ``label_targets``: those labels. For host tensors (a device tensor here costs a device sync)."""
    targets = labels[:, 1:]
    rows, columns = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    return {"label_positions": rows * labels.shape[1] + columns, "label_targets": targets[rows, columns]}


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device``: asynchronous copies from pinned memory on CUDA."""
    if device.type != "cuda":
        return {k: v if k in HOST_KEYS else v.to(device) for k, v in batch.items()}
    return {k: v if k in HOST_KEYS else v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
