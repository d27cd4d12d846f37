"""A lean forward pass for PEFT's LoRA linear layers while training: the same function, far less memory traffic.

PEFT keeps the adapter weights in fp32 (``autocast_adapter_dtype``) and, on a bf16 base, casts every LoRA input
to fp32, computes ``lora_B(lora_A(x)) * scaling`` in fp32, adds it to the bf16 base output (promoting it to
fp32) and casts the sum back: about six full passes over a (tokens x out_features) tensor per layer and a saved
fp32 copy of every layer input. On a 7B model that is more time than the base matmuls themselves.

Here the adapter runs in the input's dtype and the update is fused into one GEMM epilogue,
``addmm(base(x), A(dropout(x)), Bᵀ, alpha=scaling)``: one pass over the output, no fp32 copies. The
adapter weights stay fp32 (the optimizer's precision); their gradients arrive through the casts, as under
torch.autocast. On fp32 (CPU) the result equals PEFT's up to summation order.

Without dropout on a plain ``nn.Linear`` base, one autograd function does both passes (``_LoraLinear``): its
backward adds the LoRA term of the input's gradient in the base GEMM's epilogue too.

Only the plain case takes this path (one active adapter, not merged, no DoRA or other variant, no extra
arguments, input and base output of one dtype); anything else goes through PEFT's own forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch

LEAN_FLAG = "_lorafleet_lean_forward"
FUSED_BACKWARD_FLAG = "_lorafleet_fused_backward"  # False: the addmm path even without dropout (an ablation)


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


class _LoraLinear(torch.autograd.Function):
    """``y = x Wᵀ + bias + (s·x Aᵀ) Bᵀ`` for a frozen ``W``, no dropout. Autograd's own backward would compute the
    input's two gradients apart and add them (a write and a three-pass sum over a (tokens x in) tensor: on
    down_proj, 18,944 wide on Qwen2.5-7B); here the LoRA term is summed into the base GEMM's epilogue."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, lora_a, lora_b, scaling):  # type: ignore[no-untyped-def]
        down = torch.mm(x, lora_a.t()) * scaling
        out = torch.addmm(torch.nn.functional.linear(x, weight, bias), down, lora_b.t())
        ctx.save_for_backward(x, weight, lora_a, lora_b, down)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx: Any, grad):  # type: ignore[no-untyped-def]
        x, weight, lora_a, lora_b, down = ctx.saved_tensors
        grad_down = torch.mm(grad, lora_b) * ctx.scaling
        grad_x = torch.mm(grad, weight)
        grad_x.addmm_(grad_down, lora_a)
        return grad_x, None, None, torch.mm(grad_down.t(), x), torch.mm(grad.t(), down), None


def _peft_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    # The class's own forward, called as a plain function: binding it (``__get__``) breaks torch 2.11's dynamo
    # graph at every LoRA layer.
    return type(self).forward(self, x, *args, **kwargs)


def plain_adapter(layer: Any) -> str | None:
    """The one adapter ``layer`` runs, if it is the plain case (not disabled, not merged, no DoRA or other variant)."""
    if layer.disable_adapters or layer.merged:
        return None
    active = list(layer.active_adapters)
    if len(active) != 1 or active[0] not in layer.lora_A or active[0] in getattr(layer, "lora_variant", {}):
        return None
    return str(active[0])


def _lean_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = None if args or kwargs else plain_adapter(self)
    if name is None:
        return _peft_forward(self, x, *args, **kwargs)
    base = self.base_layer
    if (
        getattr(self, FUSED_BACKWARD_FLAG, True)
        and type(base) is torch.nn.Linear
        and isinstance(self.lora_dropout[name], torch.nn.Identity)
        and x.dtype == base.weight.dtype
    ):
        flat = x.reshape(-1, x.shape[-1])
        lora_a = self.lora_A[name].weight.to(x.dtype)
        lora_b = self.lora_B[name].weight.to(x.dtype)
        out = _LoraLinear.apply(flat, base.weight, base.bias, lora_a, lora_b, float(self.scaling[name]))
        return out.view(*x.shape[:-1], out.shape[-1])
    result = self.base_layer(x)
    if result.dtype != x.dtype:
        return _peft_forward(self, x)
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


def set_fused_lora_backward(model: Any, enabled: bool) -> None:
    """Whether lean layers without dropout take ``_LoraLinear`` (the default) or the plain addmm path."""
    kinds = _lora_layer_types()  # once: without bitsandbytes every call retries a failing import (~ms)
    for module in model.modules():
        if isinstance(module, kinds):
            module.__dict__[FUSED_BACKWARD_FLAG] = enabled


def uses_lean_lora_forward(model: Any) -> bool:
    return any(getattr(module, LEAN_FLAG, False) for module in model.modules())
