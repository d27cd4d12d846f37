"""Random-weight PEFT adapters for any Llama/Qwen2-shaped model folder, published through our object store.

Every adapter has LoRA A and B on all seven linear projections of every layer, non-zero random weights in the
model's dtype, safetensors, and metadata naming the replica's base model: to the service they are real adapters.
The weights are slices of one shared pool of Gaussian noise at random offsets (distinct per adapter, generated
once), so publishing 150 adapters of 40-80 MB costs I/O, not random-number generation.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
POOL_ELEMENTS = 1 << 25  # 32 M values: 64 MB in bf16


@dataclass(frozen=True)
class AdapterSpec:
    name: str  # store name, e.g. "bench/m0" (tenant "bench", model id "m0")
    rank: int


def projection_shapes(model_dir: Path) -> tuple[int, dict[str, tuple[int, int]], str]:
    """Layers, {projection: (in, out)} and dtype of a Llama/Qwen2-style model, from its config.json."""
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, inter, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes = {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    return cfg["num_hidden_layers"], shapes, dtype


class AdapterWriter:
    """Writes adapter folders (and publishes them) for one model shape."""

    def __init__(self, model_dir: Path, dtype: str | None = None, seed: int = 0) -> None:
        import torch

        self.layers, self.shapes, model_dtype = projection_shapes(model_dir)
        name = model_dtype if dtype in (None, "auto") else dtype
        self.dtype = getattr(torch, {"half": "float16", "float": "float32"}.get(name, name))
        generator = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(POOL_ELEMENTS, generator=generator).to(self.dtype)
        self.rng = random.Random(seed)

    def _slice(self, rows: int, cols: int, scale: float) -> Any:
        count = rows * cols
        start = self.rng.randrange(0, POOL_ELEMENTS - count)
        return (self.pool[start : start + count].view(rows, cols) * scale).contiguous()

    def write(self, folder: Path, rank: int, base_model: str, b_scale: float = 1e-3) -> Path:
        """An adapter folder; ``b_scale``: LoRA B's scale (the default keeps outputs near the base model's)."""
        from safetensors.torch import save_file

        tensors = {}
        for layer in range(self.layers):
            for proj, (fan_in, fan_out) in self.shapes.items():
                module = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                prefix = f"base_model.model.model.layers.{layer}.{module}.{proj}"
                tensors[f"{prefix}.lora_A.weight"] = self._slice(rank, fan_in, 1 / math.sqrt(fan_in))
                tensors[f"{prefix}.lora_B.weight"] = self._slice(fan_out, rank, b_scale)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": rank,
            "lora_alpha": 2 * rank,
            "lora_dropout": 0.0,
            "target_modules": list(PROJECTIONS),
            "bias": "none",
            "base_model_name_or_path": base_model,
        }
        (folder / "adapter_config.json").write_text(json.dumps(config))
        return folder

    def publish(self, store: Any, root: Path, specs: list[AdapterSpec], base_model: str) -> dict[str, int]:
        """Write and publish every spec as version v1; returns {name: weight bytes}. Local folders stay under root
        (the raw-vLLM comparison loads them from there)."""
        from lorafleet_common.adapters import AdapterMetadata, publish_adapter, sha256_file

        sizes = {}
        for spec in specs:
            folder = self.write(root / spec.name, spec.rank, base_model)
            weights = folder / "adapter_model.safetensors"
            meta = AdapterMetadata(
                name=spec.name,
                version="v1",
                base_model=base_model,
                rank=spec.rank,
                alpha=2 * spec.rank,
                target_modules=list(PROJECTIONS),
                sha256=sha256_file(weights),
            )
            publish_adapter(store, folder, meta)
            sizes[spec.name] = weights.stat().st_size
        return sizes
