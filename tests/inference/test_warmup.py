"""The LoRA warm-up's zero adapter and prompt (the warm-up itself runs on a real engine in test_engine_grpc.py)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.numpy import load_file

from lorafleet_inference.warmup import PROMPT_TOKENS, projection_shapes, warmup_prompt, write_zero_adapter

QWEN25_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "num_hidden_layers": 28,
    "vocab_size": 152064,
}


def test_zero_adapter_has_the_models_projection_shapes_and_no_weight(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(QWEN25_7B))
    folder = write_zero_adapter(tmp_path / "adapter", str(tmp_path / "model"), rank=16)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0"
    assert tensors[f"{prefix}.self_attn.k_proj.lora_B.weight"].shape == (512, 16)  # 4 kv heads x 128
    assert tensors[f"{prefix}.self_attn.q_proj.lora_A.weight"].shape == (16, 3584)
    assert tensors[f"{prefix}.mlp.down_proj.lora_A.weight"].shape == (16, 18944)
    assert len(tensors) == 14 and not any(t.any() for t in tensors.values())
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["peft_type"] == "LORA" and len(config["target_modules"]) == 7
    assert projection_shapes(QWEN25_7B | {"head_dim": 64})["o_proj"] == ("self_attn", 28 * 64, 3584)


def test_prompt_is_long_enough_for_an_eager_step_and_fits_the_context() -> None:
    ids = warmup_prompt(max_model_len=32768, vocab_size=152064)
    assert len(ids) == PROMPT_TOKENS > 512 and max(ids) < 152064
    assert len(warmup_prompt(max_model_len=300, vocab_size=1000)) == 299
    assert max(warmup_prompt(max_model_len=4096, vocab_size=120)) < 120
