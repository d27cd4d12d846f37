"""Packed rows through torch's variable-length flash attention on CUDA, instead of sdpa with a dense 4D mask.

With sdpa, packed rows are kept apart by a (batch, 1, tokens, tokens) block-diagonal mask (packing.py). A mask
rules out sdpa's flash kernel: the memory-efficient kernel then computes every score of the 2,048 x 2,048
square, though a pack of ~400-token rows needs ~10% of it. ``torch.nn.attention.varlen.varlen_attn`` (recent
torch, CUDA) runs the flash kernel on each row alone, given the rows' boundaries (``cu_seq_lens``, computed
when the batch is collated).

``enable_varlen_attention`` registers an attention implementation with transformers that takes that path
when a forward carries the boundaries (``cu_seq_lens_q``: packed batches) and is transformers' sdpa otherwise
(same mask function, same kernels): padded batches and evaluation do not change. Without a usable
``varlen_attn`` (older torch, no CUDA or a GPU older than Ampere, a signature this code does not know) nothing is
registered and packed rows keep the 4D mask; fp32 activations also keep it (the kernel takes fp16/bf16).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

VARLEN_ATTENTION = "lorafleet_varlen"

# (query, key, value, cu_seq_lens, max_len, scale) -> output, (tokens, heads, head_dim) layout, causal per row;
# None when the kernel cannot take these inputs (the caller then uses sdpa and the mask).
VarlenKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float | None], torch.Tensor | None
]


def torch_varlen_kernel() -> VarlenKernel | None:
    """torch's ``varlen_attn`` as a causal kernel, or None when this torch has none we know how to call."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal: dict[str, Any]
    if "window_size" in params:  # newer torch: (-1, 0) is causal
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    if "scale" not in params:
        return None
    native_gqa = "enable_gqa" in params

    def kernel(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int, scale: float | None
    ) -> torch.Tensor | None:
        if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] > 256:  # the flash kernel's limits
            return None
        extra = dict(causal)
        if k.shape[1] != q.shape[1]:
            if native_gqa:
                extra["enable_gqa"] = True
            else:  # query head h reads key/value head h // groups, as transformers' repeat_kv lays them out
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, **extra)
        return out[0] if isinstance(out, tuple) else out

    return kernel


def kernel_works(kernel: VarlenKernel, device: torch.device) -> bool:
    """A small causal two-row attention, forward and backward, against sdpa row by row: False if the kernel fails or
    differs (a torch whose varlen_attn has no backward, or other semantics). Draws nothing from torch's global RNG."""
    generator = torch.Generator(device=device).manual_seed(0)
    lengths, heads, kv_heads, dim = [5, 11], 4, 2, 64

    def tensor(h: int) -> torch.Tensor:
        x = torch.randn(sum(lengths), h, dim, generator=generator, device=device, dtype=torch.bfloat16)
        return x.requires_grad_()

    q, k, v = tensor(heads), tensor(kv_heads), tensor(kv_heads)
    cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32, device=device)
    try:
        out = kernel(q, k, v, cu, max(lengths), None)
        if out is None:
            return False
        out.float().square().sum().backward()
    except RuntimeError as exc:
        log.warning("torch's varlen attention is unusable here (%s): packed rows keep sdpa with a 4D mask", exc)
        return False
    grads = [t.grad for t in (q, k, v)]
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    parts = []
    for start, end in ((0, lengths[0]), (lengths[0], sum(lengths))):
        qs = qr[start:end].transpose(0, 1)[None]
        ks = kr[start:end].repeat_interleave(heads // kv_heads, 1).transpose(0, 1)[None]
        vs = vr[start:end].repeat_interleave(heads // kv_heads, 1).transpose(0, 1)[None]
        parts.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)[0].transpose(0, 1))
    reference = torch.cat(parts)
    reference.float().square().sum().backward()

    def relative(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
        if a is None or b is None:
            return float("inf")
        a, b = a.detach().float(), b.detach().float()
        return float((a - b).norm() / b.norm().clamp_min(1e-12))

    errors = [relative(out, reference)] + [relative(g, r.grad) for g, r in zip(grads, (qr, kr, vr), strict=True)]
    close = max(errors) < 2e-2  # bf16: ~1e-2 at worst; a wrong mask or layout gives O(1)
    if not close:
        log.warning("torch's varlen attention differs from sdpa here: packed rows keep sdpa with a 4D mask")
    return close


def _attention_function(kernel: VarlenKernel) -> Callable[..., tuple[torch.Tensor, None]]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        sliding_window: int | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        cu = kwargs.get("cu_seq_lens_q")
        if cu is not None and not dropout and sliding_window is None:
            batch, heads, width, dim = query.shape  # transformers hands over (batch, heads, tokens, head_dim)
            q = query.transpose(1, 2).reshape(batch * width, heads, dim)
            k = key.transpose(1, 2).reshape(batch * width, key.shape[1], dim)
            v = value.transpose(1, 2).reshape(batch * width, value.shape[1], dim)
            out = kernel(q, k, v, cu, int(kwargs["max_length_q"]), scaling)
            if out is not None:  # sdpa's output layout: (batch, tokens, heads, head_dim)
                return out.view(batch, width, heads, dim), None
        out, weights = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        return out, weights

    return attention


def register_varlen_attention(kernel: VarlenKernel) -> None:
    """Make ``VARLEN_ATTENTION`` an attention implementation transformers knows (sdpa's masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_ATTENTION, _attention_function(kernel))
    AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)


def enable_varlen_attention(model: Any, kernel: VarlenKernel | None = None) -> bool:
    """Switch an sdpa ``model`` to varlen attention for packed batches; False (unchanged) when it cannot be."""
    if kernel is None:
        on_ampere_or_newer = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
        kernel = torch_varlen_kernel() if on_ampere_or_newer else None  # flash kernels: sm80 and newer
        if kernel is not None and not kernel_works(kernel, torch.device("cuda", torch.cuda.current_device())):
            kernel = None
    implementation = str(getattr(model.config, "_attn_implementation", "") or "")
    if kernel is None or implementation not in ("sdpa", VARLEN_ATTENTION):
        return False
    try:
        register_varlen_attention(kernel)
        model.set_attn_implementation(VARLEN_ATTENTION)
    except (ImportError, ValueError, AttributeError) as exc:  # a transformers without these interfaces
        log.warning("packed rows keep sdpa with a 4D mask: varlen attention could not be set up (%s)", exc)
        return False
    return str(model.config._attn_implementation) == VARLEN_ATTENTION
