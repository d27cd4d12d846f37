"""The base model with a fresh LoRA adapter, as a job trains it: bf16 on CUDA (or a 4-bit NF4 base: QLoRA), fp32
elsewhere; flash or varlen attention for packed rows on CUDA; the lean LoRA forward and projection groups."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from lorafleet_trainer.attention import enable_varlen_attention
from lorafleet_trainer.lora_forward import set_lean_lora_forward
from lorafleet_trainer.lora_groups import group_lora_projections
from lorafleet_trainer.manifest import LoraSpec


class QuantizationUnavailable(RuntimeError):
    """The manifest asks for a quantized base that this trainer cannot load (no CUDA, no bitsandbytes)."""


def load_lora_model(
    model_path: str,
    lora: LoraSpec,
    seed: int,
    device: torch.device,
    *,
    local_only: bool,
    dtype: torch.dtype | None = None,
) -> Any:
    """The base model with a fresh LoRA adapter; only the adapter trains. bf16 on CUDA, fp32 elsewhere.

    With ``lora.quantization == "nf4"`` (QLoRA) the frozen base is loaded in 4-bit NF4 with double
    quantization and bf16 compute; that needs CUDA and bitsandbytes (QuantizationUnavailable otherwise).
    Flash-attention is used on CUDA when the package is installed (packed rows then go varlen).
    """
    from transformers import AutoModelForCausalLM

    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    options: dict[str, Any] = {"dtype": dtype, "local_files_only": local_only}
    model: Any
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        options["attn_implementation"] = "flash_attention_2"
    if lora.quantization == "nf4":
        problem = quantization_problem(lora, device)
        if problem:
            raise QuantizationUnavailable(problem)
        from transformers import BitsAndBytesConfig  # transformers imports bitsandbytes only when it loads

        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        index = device.index if device.index is not None else torch.cuda.current_device()
        model = AutoModelForCausalLM.from_pretrained(model_path, device_map={"": index}, **options)
        # No prepare_model_for_kbit_training: it would copy the embeddings, lm_head and norms to fp32, 2.2 GiB
        # more on Qwen2.5-7B than the 4-bit weights' 3.6, for no stability bf16 lacks (RMSNorm computes in
        # fp32 inside). Checkpointing and input gradients are set up by train() from the training spec.
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, **options)
        model = model.to(device)
    if device.type == "cuda" and "attn_implementation" not in options:
        enable_varlen_attention(model)  # packed rows: flash kernels per row instead of a dense mask
    return add_lora(model, lora, seed)


def add_lora(model: Any, lora: LoraSpec, seed: int) -> Any:
    """``model`` (frozen) wrapped with a fresh PEFT LoRA adapter of the manifest's shape."""
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    # An integral alpha is written as an int: some adapter readers type lora_alpha as int.
    alpha: Any = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        use_dora=False,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)  # LoRA A is initialised at random
    peft_model = get_peft_model(model, config)
    set_lean_lora_forward(peft_model)  # lora_forward.py: PEFT's fp32 detour costs more than the base matmuls
    group_lora_projections(peft_model)  # lora_groups.py: q/k/v and gate/up as one GEMM each, the update inside
    return peft_model


def quantization_problem(lora: LoraSpec, device: torch.device) -> str | None:
    """Why ``lora.quantization`` cannot run here, or None. Checks without importing bitsandbytes."""
    if lora.quantization == "none":
        return None
    if device.type != "cuda":
        return f"QLoRA (lora.quantization: {lora.quantization}) needs a CUDA GPU; this trainer has none"
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"QLoRA (lora.quantization: {lora.quantization}) needs the bitsandbytes package; this trainer lacks it"
    return None
