"""LoRA projection groups: the layers that read one input (q/k/v, gate/up) share one pass over it, the update inside
their GEMMs.

The lean forward (lora_forward.py) still costs, per LoRA layer, one extra pass over the layer's input (``x Aᵀ``)
and a read and a write of its whole output (the update added by ``addmm``); in the backward pass, one more
(tokens x in) product and a sum per layer where autograd adds the input's gradients together. On Qwen2.5-7B's
gate and up projections (18,944 outputs each) that output traffic alone is larger than the input's 3,584.

Here the siblings that share an input are one group, and their frozen weights one buffer ``S`` whose rows are the
members' weights, each followed by its adapter's B matrix in the member's own columns of R (the sum of the ranks)
extra ones, zero elsewhere. The update is folded into the contraction::

    d = x · [A_1; A_2; ...]ᵀ                          one small GEMM, one pass over x for the whole group
    y_j = [x | s·d] · S_jᵀ (+ bias_j)                 the member's GEMM with K = in + R: the update is in the product
    ∂[x | s·d] = Σ_j ∂y_j · S_j                       the members' GEMMs summed in their epilogues
    ∂x = ∂[x | s·d][:, :in] + (s·∂d) · A              one small addmm

B's gradients are ``∂y_jᵀ · s_j d_j`` per member, A's ``(s·∂d)ᵀ x``. Each member gets an output of its own (not a
slice of one: autograd would turn each slice's gradient into a zero-filled tensor of the whole output). The layers'
own ``base_layer.weight`` (and q/k/v's biases) become views into the buffer: no memory is added, and only
``[x | s·d]`` is kept for the backward pass (not x and d apart).

Why a buffer and not a concatenation per forward: a copy of the frozen weights every step would cost more than it
saves. The B blocks in the buffer are bf16 copies of the (fp32) B parameters, refreshed whenever a parameter changed
(an optimizer step, a checkpoint load: their version counters tell): before each forward pass of the decoder (the
compiled layers run inside it and do not check) and before an eager group's product.

The first member called with an input computes the group's outputs and keeps its siblings' until they are
called with that same tensor (the models call q, k, v, then gate, up, in a row); a sibling called with anything else
computes on its own, through the lean forward. With LoRA dropout on, each member keeps its own mask, drawn in the
same order as PEFT draws them. Anything the lean forward would not take (several adapters, merged, DoRA, a
quantized base) leaves a layer out of any group.

Measured on an H100 (docs/benchmarks.md, trainer run 4): 7% less GPU time per eager micro-batch of Qwen2.5-7B, and
0.75-1.04 s less per benchmark epoch with gradient checkpointing; compiled without checkpointing no gain (inductor
fuses the plain path's elementwise work itself).
"""

from __future__ import annotations

import types
from typing import Any

import torch

from lorafleet_trainer.lora_forward import _lean_forward, _lora_layer_types, plain_adapter

GROUP_ATTRIBUTE = "_lorafleet_lora_group"
HOOK_ATTRIBUTE = "_lorafleet_lora_group_hook"
# Sibling layers a decoder calls with one input, by name (Llama, Qwen2, Mistral and their kin).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _products(augmented: torch.Tensor, weights: list[torch.Tensor], biases: list[Any]) -> tuple[torch.Tensor, ...]:
    # One GEMM per member on the shared augmented input: separate outputs, so that autograd hands each member's
    # gradient over as is (slices of one output would cost a zero-filled (tokens x outputs) tensor each).
    return tuple(torch.nn.functional.linear(augmented, w, b) for w, b in zip(weights, biases, strict=True))


def _augmented_gradients(
    ctx: Any, grads: tuple[torch.Tensor | None, ...], augmented: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """(∂[x | s·d], each B block's gradient) from the members' output gradients."""
    n = ctx.in_features
    grad_augmented: torch.Tensor | None = None
    grad_b: list[torch.Tensor | None] = []
    for grad, weight, cols, dtype in zip(grads, ctx.weights, ctx.columns, ctx.b_dtypes, strict=True):
        if grad is None:
            grad_b.append(None)
            continue
        grad = grad.reshape(-1, grad.shape[-1])
        if grad_augmented is None:
            grad_augmented = torch.mm(grad, weight)
        else:
            grad_augmented.addmm_(grad, weight)  # accumulated in the GEMM's epilogue
        grad_b.append(torch.mm(grad.t(), augmented[:, n + cols.start : n + cols.stop]).to(dtype))
    if grad_augmented is None:
        grad_augmented = torch.zeros_like(augmented)
    return grad_augmented, grad_b


class _GroupProduct(torch.autograd.Function):
    """Each member's ``y_j = [x | s·x Aᵀ] S_jᵀ + bias_j``; gradients of x, A and the B blocks (S is frozen)."""

    @staticmethod
    def forward(ctx: Any, x, lora_a, scale, layout, *lora_b):  # type: ignore[no-untyped-def]
        weights, biases, columns = layout
        augmented = torch.cat([x, torch.mm(x, lora_a.t()) * scale], dim=1)
        ctx.save_for_backward(augmented, lora_a, scale)
        ctx.weights, ctx.columns, ctx.in_features = weights, columns, x.shape[1]
        ctx.b_dtypes = [b.dtype for b in lora_b]
        return _products(augmented, weights, biases)

    @staticmethod
    def backward(ctx: Any, *grads):  # type: ignore[no-untyped-def]
        augmented, lora_a, scale = ctx.saved_tensors
        n = ctx.in_features
        grad_augmented, grad_b = _augmented_gradients(ctx, grads, augmented)
        grad_down = grad_augmented[:, n:] * scale
        grad_x = torch.addmm(grad_augmented[:, :n], grad_down, lora_a)
        grad_a = torch.mm(grad_down.t(), augmented[:, :n])
        return (grad_x, grad_a, None, None, *grad_b)


class _GroupProductDropout(torch.autograd.Function):
    """Each member's ``y_j = [x | s·d] S_jᵀ + bias_j`` for a ``s·d`` computed outside (LoRA dropout on): gradients
    of x, s·d and the B blocks."""

    @staticmethod
    def forward(ctx: Any, x, scaled_down, layout, *lora_b):  # type: ignore[no-untyped-def]
        weights, biases, columns = layout
        augmented = torch.cat([x, scaled_down], dim=1)
        ctx.save_for_backward(augmented)
        ctx.weights, ctx.columns, ctx.in_features = weights, columns, x.shape[1]
        ctx.b_dtypes = [b.dtype for b in lora_b]
        return _products(augmented, weights, biases)

    @staticmethod
    def backward(ctx: Any, *grads):  # type: ignore[no-untyped-def]
        (augmented,) = ctx.saved_tensors
        n = ctx.in_features
        grad_augmented, grad_b = _augmented_gradients(ctx, grads, augmented)
        return (grad_augmented[:, :n], grad_augmented[:, n:], None, *grad_b)


class LoraGroup:
    """Sibling LoRA layers of one input, their frozen weights and B blocks in one buffer."""

    def __init__(self, members: list[Any], adapter: str):
        self.members = members
        self.adapter = adapter
        bases = [m.base_layer for m in members]
        self.in_features = bases[0].in_features
        self.out_sizes = [b.out_features for b in bases]
        self.ranks = [m.lora_A[adapter].weight.shape[0] for m in members]
        weight = bases[0].weight
        rows, rank = sum(self.out_sizes), sum(self.ranks)
        self.weight = torch.zeros(rows, self.in_features + rank, dtype=weight.dtype, device=weight.device)
        has_bias = bases[0].bias is not None
        self.bias = torch.empty(rows, dtype=weight.dtype, device=weight.device) if has_bias else None
        self.layout: list[tuple[slice, slice]] = []
        row = col = 0
        for base, out, r in zip(bases, self.out_sizes, self.ranks, strict=True):
            rows_j, cols_j = slice(row, row + out), slice(col, col + r)
            self.layout.append((rows_j, cols_j))
            with torch.no_grad():
                self.weight[rows_j, : self.in_features] = base.weight
                base.weight = torch.nn.Parameter(self.weight[rows_j, : self.in_features], requires_grad=False)
                if self.bias is not None:
                    self.bias[rows_j] = base.bias
                    base.bias = torch.nn.Parameter(self.bias[rows_j], requires_grad=False)
            row, col = row + out, col + r
        self.member_weights = [self.weight[rows] for rows, _ in self.layout]  # contiguous row blocks, B included
        self.member_biases = [None if self.bias is None else self.bias[rows] for rows, _ in self.layout]
        self.scales = torch.cat(
            [torch.full((r,), float(m.scaling[adapter])) for m, r in zip(members, self.ranks, strict=True)]
        ).to(weight.device, weight.dtype)
        self.dropout = any(not isinstance(m.lora_dropout[adapter], torch.nn.Identity) for m in members)
        self.seen: list[tuple[int, int]] = []
        self.pending: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None
        self.refresh()

    def refresh(self) -> None:
        """Copy the B parameters into the buffer if any changed since the last copy."""
        lora_b = [m.lora_B[self.adapter].weight for m in self.members]
        stamps = [(b._version, b.data_ptr()) for b in lora_b]
        if stamps == self.seen:
            return
        with torch.no_grad():
            for b, (rows, cols) in zip(lora_b, self.layout, strict=True):
                start = self.in_features
                self.weight[rows, start + cols.start : start + cols.stop] = b
        self.seen = stamps

    def usable(self, x: torch.Tensor) -> bool:
        return x.dtype == self.weight.dtype and all(plain_adapter(m) == self.adapter for m in self.members)

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each member's output for ``x``."""
        flat = x.reshape(-1, self.in_features)
        lora_b = [m.lora_B[self.adapter].weight for m in self.members]
        layout = (self.member_weights, self.member_biases, [cols for _, cols in self.layout])
        if self.dropout:  # each layer its own mask, in the members' order: PEFT's draws
            down = torch.cat(
                [
                    torch.nn.functional.linear(
                        m.lora_dropout[self.adapter](flat), m.lora_A[self.adapter].weight.to(x.dtype)
                    )
                    for m in self.members
                ],
                dim=1,
            )
            outs = _GroupProductDropout.apply(flat, down * self.scales, layout, *lora_b)
        else:
            lora_a = torch.cat([m.lora_A[self.adapter].weight.to(x.dtype) for m in self.members])
            outs = _GroupProduct.apply(flat, lora_a, self.scales, layout, *lora_b)
        shape = x.shape[:-1]
        return tuple(out.view(*shape, out.shape[-1]) for out in outs)


def _group_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    group: LoraGroup = getattr(self, GROUP_ATTRIBUTE)
    index = group.members.index(self)
    pending = group.pending
    if pending is not None and pending[0] is x and index in pending[1]:
        out = pending[1].pop(index)
        if not pending[1]:
            group.pending = None
        return out
    if args or kwargs or not group.usable(x):
        return _lean_forward(self, x, *args, **kwargs)
    if not torch.compiler.is_compiling():  # compiled layers run inside the decoder, whose pre-hook refreshed
        group.refresh()
    outputs = group.outputs(x)
    rest = {j: out for j, out in enumerate(outputs) if j != index}
    group.pending = (x, rest) if rest else None
    return outputs[index]


def _refresh_groups(groups: list[LoraGroup]) -> Any:
    def hook(module: Any, args: Any, kwargs: Any) -> None:
        for group in groups:
            group.pending = None  # a sibling never called last time: its output is not kept
            group.refresh()

    return hook


def group_lora_projections(model: Any) -> int:
    """Form the groups of ``model`` (a PEFT model on its final device, lean forward on); how many layers joined.

    The decoder refreshes the groups' B blocks before each forward pass (a pre-hook on it: the decoder runs eagerly
    even when its layers are compiled, and the training loop calls it without the language-model head).
    """
    plain = _lora_layer_types()[0]  # once: without bitsandbytes every call retries a failing import
    groups: list[LoraGroup] = []
    for parent in model.modules():
        for names in SIBLINGS:
            members = [getattr(parent, name, None) for name in names]
            members = [m for m in members if type(m) is plain]
            if len(members) < 2 or any(getattr(m, GROUP_ATTRIBUTE, None) for m in members):
                continue
            adapter = _single_plain_adapter(members)
            if adapter is None:
                continue
            group = LoraGroup(members, adapter)
            for m in members:
                m.__dict__[GROUP_ATTRIBUTE] = group
                m.__dict__["forward"] = types.MethodType(_group_forward, m)
            groups.append(group)
    if groups:
        decoder = model.get_base_model().get_decoder()
        handle = decoder.register_forward_pre_hook(_refresh_groups(groups), with_kwargs=True)
        decoder.__dict__[HOOK_ATTRIBUTE] = handle
    return sum(len(g.members) for g in groups)


def ungroup_lora_projections(model: Any) -> None:
    """Send every grouped layer back to the lean forward (the weights stay views of the buffers: same values)."""
    for module in model.modules():
        if module.__dict__.pop(GROUP_ATTRIBUTE, None) is not None:
            module.__dict__["forward"] = types.MethodType(_lean_forward, module)
    decoder = model.get_base_model().get_decoder()
    handle = decoder.__dict__.pop(HOOK_ATTRIBUTE, None)
    if handle is not None:
        handle.remove()


def uses_lora_groups(model: Any) -> bool:
    return any(GROUP_ATTRIBUTE in module.__dict__ for module in model.modules())


def _single_plain_adapter(members: list[Any]) -> str | None:
    """The one adapter all members train, if the lean forward would take each of them (see lora_forward.py)."""
    name = plain_adapter(members[0])
    if name is None:
        return None
    bases = [m.base_layer for m in members]
    for m, base in zip(members, bases, strict=True):
        if plain_adapter(m) != name or type(base) is not torch.nn.Linear:
            return None
        if base.weight.dtype != bases[0].weight.dtype or base.weight.device != bases[0].weight.device:
            return None
        if base.in_features != bases[0].in_features or (base.bias is None) != (bases[0].bias is None):
            return None
    return name
