"""Run the LoRA kernels' prefill variants once before the replica reports SERVING.

On a GPU, Triton compiles a kernel variant the first time a launch configuration meets a new specialization.
vLLM's CUDA-graph capture at start covers the decode sizes, not the prefill steps above the largest captured
size. So the first long LoRA prompt after a start used to compile about 14 shrink/expand variants in the middle
of traffic (H100: a first pass of 3,904 output tokens/s against 6,276 once warm; docs/benchmarks.md).

Here one request, through an all-zero adapter of the engine's full rank on every projection of the first decoder
layer (vLLM runs its LoRA kernels on every wrapped layer for a token with an adapter, whatever the adapter
holds), with a prompt longer than the largest captured size, runs those variants. The adapter is removed
afterwards and never takes a slot from a real one; its id is outside the range the adapter manager hands out.
A failed warm-up is logged and the replica serves anyway: it only costs the first request that compile time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from lorafleet_inference.engine import Engine, make_lora_request, make_sampling_params, token_prompt

log = logging.getLogger(__name__)

WARMUP_LORA_ID = 2**31 - 1  # the adapter manager counts up from 1
WARMUP_NAME = "lorafleet-warmup"
PROMPT_TOKENS = 1024  # above vLLM's largest CUDA-graph size (512): a step that runs the kernels eagerly


def projection_shapes(config: dict[str, Any]) -> dict[str, tuple[str, int, int]]:
    """Each projection of a Llama/Qwen2-style decoder layer: (its block, in_features, out_features)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    return {
        "q_proj": ("self_attn", hidden, heads * head_dim),
        "k_proj": ("self_attn", hidden, kv),
        "v_proj": ("self_attn", hidden, kv),
        "o_proj": ("self_attn", heads * head_dim, hidden),
        "gate_proj": ("mlp", hidden, inter),
        "up_proj": ("mlp", hidden, inter),
        "down_proj": ("mlp", inter, hidden),
    }


def write_zero_adapter(folder: Path, model_path: str, rank: int) -> Path:
    """A PEFT adapter of ``rank`` on every projection of layer 0, all weights zero: its output is the base's."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    shapes = projection_shapes(config)
    tensors = {}
    for name, (block, fan_in, fan_out) in shapes.items():
        prefix = f"base_model.model.model.layers.0.{block}.{name}"
        tensors[f"{prefix}.lora_A.weight"] = np.zeros((rank, fan_in), dtype=np.float16)
        tensors[f"{prefix}.lora_B.weight"] = np.zeros((fan_out, rank), dtype=np.float16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,
        "target_modules": sorted(shapes),
        "bias": "none",
        "base_model_name_or_path": model_path,
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
    return folder


def warmup_prompt(max_model_len: int, vocab_size: int) -> list[int]:
    """Token ids for the warm-up prompt: as long as PROMPT_TOKENS, leaving room for one generated token."""
    length = max(1, min(PROMPT_TOKENS, max_model_len - 1))
    return [100 + i % max(1, vocab_size - 100) for i in range(length)]


async def warm_up_lora(engine: Engine, model_path: str, rank: int, max_model_len: int, timeout_s: float) -> bool:
    """One request through a zero adapter, then the adapter removed; False (logged) if anything failed."""
    began = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="lorafleet-warmup-") as tmp:
            folder = await asyncio.to_thread(write_zero_adapter, Path(tmp), model_path, rank)
            vocab = json.loads((Path(model_path) / "config.json").read_text())["vocab_size"]
            request = make_lora_request(WARMUP_NAME, WARMUP_LORA_ID, str(folder))
            params = make_sampling_params(max_tokens=1, temperature=0.0)
            token_ids = warmup_prompt(max_model_len, vocab)
            prompt = token_prompt(token_ids)

            async def run() -> None:
                async for _ in engine.generate(prompt, params, f"warmup-{uuid.uuid4().hex}", lora_request=request):
                    pass

            try:
                await asyncio.wait_for(run(), timeout_s)
            finally:
                await asyncio.wait_for(engine.remove_lora(WARMUP_LORA_ID), timeout_s)
    except Exception:
        log.warning("LoRA warm-up failed; the first LoRA request may compile kernels", exc_info=True)
        return False
    log.info("LoRA warm-up: %d-token prompt through a zero adapter, %.1f s", len(token_ids), time.monotonic() - began)
    return True
