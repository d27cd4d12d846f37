"""Counting the reads of tensor values by Python while some code runs: each one is a device sync on CUDA.

``.item()``, ``float()``, ``.tolist()``, ``if tensor:``, a boolean mask's index, ``nonzero`` and the like make the
host wait until the GPU has computed the value, and the GPU then idles while the host catches up. The training
hot path (a micro-batch's forward, loss and backward) should have none; this counter lets a test on the CPU,
where nothing syncs, see the reads that would (test_compiled_layers.py). It sees what Python calls: reads inside
C++ kernels (autograd's backward of built-in ops) are not counted; on CUDA, ``torch.cuda.set_sync_debug_mode``
sees those too (bench/trainer.py --profile counts them that way).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.__format__,
    torch.Tensor.__repr__,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.argwhere,
    torch.argwhere,
    torch.Tensor.masked_select,
    torch.masked_select,
    torch.Tensor.unique,
    torch.unique,
    torch.Tensor.unique_consecutive,
    torch.unique_consecutive,
    torch.Tensor.bincount,
    torch.bincount,
}


def _is_boolean_index(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _moves_to_host(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu" and str(target).startswith("cpu")


class HostReadCounter(TorchFunctionMode):
    """``with HostReadCounter() as reads:`` ... ``reads.names``: what read a tensor's value, in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if (
            func in _READS
            or (func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _is_boolean_index(args[1]))
            or (func is torch.Tensor.to and _moves_to_host(args, kwargs))
        ):
            self.names.append(getattr(func, "__name__", repr(func)))
        return func(*args, **kwargs)
