"""A lean forward pass for PEFT's LoRA linear layers while training: the same function, far less memory traffic.

PEFT keeps the adapter weights in fp32 (``autocast_adapter_dtype``) and, on a bf16 base, casts every LoRA input
to fp32, computes ``lora_B(lora_A(x)) * scaling`` in fp32, adds it to the bf16 base output (promoting it to
fp32) and casts the sum back: about six full passes over a (tokens x out_features) tensor per layer and a saved
fp32 copy of every layer input. On a 7B model that is more time than the base matmuls themselves.

Here the adapter runs in the input's dtype and the update is fused into one GEMM epilogue,
``addmm(base(x), A(dropout(x)), Bᵀ, alpha=scaling)``: one pass over the output, no fp32 copies. The
adapter weights stay fp32 (the optimizer's precision); their gradients arrive through the casts, as under
torch.autocast. On fp32 (CPU) the result equals PEFT's up to summation order.

Only the plain case takes this path (one active adapter, not merged, no DoRA or other variant, no extra
arguments, input and base output of one dtype); anything else goes through PEFT's own forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch

LEAN_FLAG = "_lorafleet_lean_forward"


def _lora_layer_types() -> tuple[type, ...]:
    from peft.tuners.lora.layer import Linear

    kinds: list[type] = [Linear]
    try:
        from peft.tuners.lora.bnb import Linear4bit  # defined only when bitsandbytes is installed
    except ImportError:
        pass
    else:
        kinds.append(Linear4bit)
    return tuple(kinds)


def _lean_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    peft_forward = type(self).forward.__get__(self)
    if args or kwargs or self.disable_adapters or self.merged:
        return peft_forward(x, *args, **kwargs)
    active = self.active_adapters
    if len(active) != 1 or active[0] not in self.lora_A or active[0] in getattr(self, "lora_variant", {}):
        return peft_forward(x)
    name = active[0]
    result = self.base_layer(x)
    if result.dtype != x.dtype:
        return peft_forward(x)
    lora_a = self.lora_A[name].weight.to(x.dtype)
    lora_b = self.lora_B[name].weight.to(x.dtype)
    down = torch.nn.functional.linear(self.lora_dropout[name](x), lora_a)
    out_features = result.shape[-1]
    fused = torch.addmm(
        result.reshape(-1, out_features), down.reshape(-1, lora_a.shape[0]), lora_b.t(), alpha=self.scaling[name]
    )
    return fused.view(result.shape)


def set_lean_lora_forward(model: Any, enabled: bool = True) -> int:
    """Route every plain LoRA linear layer of ``model`` through the lean forward (or back); how many layers."""
    kinds = _lora_layer_types()
    count = 0
    for module in model.modules():
        if not isinstance(module, kinds):
            continue
        if enabled:
            module.__dict__["forward"] = types.MethodType(_lean_forward, module)
            setattr(module, LEAN_FLAG, True)
        else:
            module.__dict__.pop("forward", None)
            module.__dict__.pop(LEAN_FLAG, None)
        count += 1
    return count


def uses_lean_lora_forward(model: Any) -> bool:
    return any(getattr(module, LEAN_FLAG, False) for module in model.modules())
