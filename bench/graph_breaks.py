"""Graph breaks in the compiled decoder layers (``training.compile``) on this machine's torch, per LoRA code path.

Why: dynamo's rules change between torch releases. The CPU tests (torch 2.13) see one graph per decoder layer, but
the GPU image's torch 2.11 broke the graph at every LoRA layer (binding PEFT's forward with ``__get__``), which left
seven compiled pieces per layer and nothing in the tests to notice. This runs a few optimizer steps of
``train_loop.train`` on a tiny Qwen2 (bf16 on CUDA, fp32 on a CPU) with dynamo's ``eager`` backend (tracing only:
seconds) and prints the graphs made and the graph breaks, with their reasons, for each path:

  grouped          the default: lean forward, projection groups, fused backward (lora_groups.py, lora_forward.py)
  nogroup nofuse   each LoRA layer alone through the plain lean forward
  ... dropout      LoRA dropout 0.05 (groups draw a mask per layer)
  ... gc           gradient checkpointing

    python bench/graph_breaks.py                                  # all four
    python bench/graph_breaks.py --variants grouped --fail-on-breaks   # exit 1 on any break
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter

import torch

from lorafleet_trainer import train_loop
from lorafleet_trainer.attention import enable_varlen_attention
from lorafleet_trainer.lora_forward import set_fused_lora_backward
from lorafleet_trainer.lora_groups import ungroup_lora_projections
from lorafleet_trainer.manifest import LoraSpec, TrainingSpec
from lorafleet_trainer.model_loading import add_lora
from lorafleet_trainer.tokenize import IGNORE_INDEX, TokenizedExample

VARIANTS = ["grouped", "nogroup nofuse", "grouped dropout", "grouped gc"]


def tiny_rows(count: int, seed: int) -> list[TokenizedExample]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        n = rng.randint(20, 120)
        ids = [rng.randrange(10, 1000) for _ in range(n)]
        rows.append(TokenizedExample(ids, [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]))
    return rows


def count_breaks(variant: str, device: torch.device) -> tuple[int, Counter[str]]:
    from torch._dynamo.utils import counters
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        enable_varlen_attention(model)  # the trainer's packed attention on CUDA
    model = add_lora(model, LoraSpec(rank=8, alpha=32, dropout=0.05 if "dropout" in variant else 0.0), 0)
    if "nogroup" in variant:
        ungroup_lora_projections(model)
    if "nofuse" in variant:
        set_fused_lora_backward(model, False)
    training = TrainingSpec(
        epochs=1,
        batch_size=2,
        gradient_accumulation_steps=2,
        max_length=256,
        warmup_ratio=0.0,
        packing=True,
        gradient_checkpointing="gc" in variant,
        compile=True,
    )
    torch._dynamo.reset()
    counters.clear()
    train_loop.train(model, tiny_rows(24, 0), training, 0, lambda report: None, device, compile_backend="eager")
    breaks: Counter[str] = Counter({str(reason): n for reason, n in counters["graph_break"].items()})
    return int(counters["stats"]["unique_graphs"]), breaks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--fail-on-breaks", action="store_true", help="exit 1 if any variant breaks its graph")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__}, {device.type}; tiny Qwen2 (3 layers), compiled layers, backend eager")
    broken = 0
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        graphs, breaks = count_breaks(variant, device)
        broken += sum(breaks.values())
        print(f"{variant:<24} graphs {graphs:3d}  graph breaks {sum(breaks.values()):3d}")
        for reason, n in breaks.most_common(6):
            print(f"    {n:4d}  {reason[:300]}")
    return 1 if broken and args.fail_on_breaks else 0


if __name__ == "__main__":
    sys.exit(main())
