"""Random weights instead of a checkpoint: a model built from its folder's config.json, directly on the device.

The same idea as vLLM's ``load_format="dummy"``: the real architecture's speed and memory without writing or
reading 15 GB of weights. Only ``AutoModelForCausalLM.from_pretrained`` is replaced, and only inside the
``random_weights`` context, so everything around it (our loader's options, PEFT, the train loop, the worker)
is the code a job runs. With a bitsandbytes 4-bit ``quantization_config`` (QLoRA) the bf16 weights are then
quantized on the GPU into bnb ``Linear4bit`` layers, one layer at a time, as transformers does while it loads
a checkpoint; the output head stays in bf16 (transformers' default too).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def quantize_nf4(model: Any, quantization: Any) -> int:
    """Replace every nn.Linear but the output head by a bnb Linear4bit holding the same weights; how many."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=quantization.bnb_4bit_compute_dtype,
                compress_statistics=quantization.bnb_4bit_use_double_quant,
                quant_type=quantization.bnb_4bit_quant_type,
                device="meta",
            )
            weight = bnb.nn.Params4bit(
                child.weight.data,
                requires_grad=False,
                compress_statistics=quantization.bnb_4bit_use_double_quant,
                quant_type=quantization.bnb_4bit_quant_type,
                module=layer,
            )
            layer.weight = weight.to(child.weight.device)  # quantizes on the GPU
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer)  # the bf16 weight is freed with ``child``
            replaced += 1
    model.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets; PEFT picks its 4-bit LoRA layers by it
    model.config.quantization_config = quantization
    return replaced


def build_random_model(path: str, options: dict[str, Any], device: torch.device, seed: int) -> Any:
    """``from_pretrained(path, **options)``'s model, with random weights made on ``device`` (or device_map's GPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    dtype = options.get("dtype") or options.get("torch_dtype") or torch.float32
    target = device
    if options.get("device_map") is not None:
        target = torch.device("cuda", int(options["device_map"][""]))
    extra = {"attn_implementation": options["attn_implementation"]} if "attn_implementation" in options else {}
    torch.manual_seed(seed)
    with target, default_dtype(dtype):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
    model.eval()  # from_pretrained's state
    quantization = options.get("quantization_config")
    if quantization is not None:
        if not getattr(quantization, "load_in_4bit", False):
            raise ValueError(f"random weights: only 4-bit bitsandbytes quantization is supported, not {quantization}")
        quantize_nf4(model, quantization)
        if target.type == "cuda":
            torch.cuda.empty_cache()
    return model


@contextlib.contextmanager
def random_weights(device: torch.device, seed: int = 0, log: list[dict[str, Any]] | None = None) -> Iterator[None]:
    """Inside: ``AutoModelForCausalLM.from_pretrained(folder, ...)`` builds the folder's architecture with random
    weights; each build is appended to ``log`` (path, seconds, quantized)."""
    from transformers import AutoModelForCausalLM

    own = "from_pretrained" in AutoModelForCausalLM.__dict__
    original = AutoModelForCausalLM.__dict__.get("from_pretrained")

    def from_pretrained(cls: Any, path: str | Path, *args: Any, **options: Any) -> Any:
        began = time.perf_counter()
        model = build_random_model(str(path), options, device, seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if log is not None:
            log.append(
                {
                    "path": str(path),
                    "seconds": time.perf_counter() - began,
                    "quantized": options.get("quantization_config") is not None,
                }
            )
        return model

    AutoModelForCausalLM.from_pretrained = classmethod(from_pretrained)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        if own:
            AutoModelForCausalLM.from_pretrained = original  # type: ignore[method-assign]
        else:
            del AutoModelForCausalLM.from_pretrained
