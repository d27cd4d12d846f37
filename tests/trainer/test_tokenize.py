"""The loss mask on the embedded model's real tokenizer and chat template (ChatML)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lorafleet_trainer.datasets import Example, Message
from lorafleet_trainer.tokenize import IGNORE_INDEX, ChatTokenizer


@pytest.fixture(scope="module")
def tokenizer(embedded_model_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_path)


@pytest.fixture(scope="module")
def chat(tokenizer: Any) -> ChatTokenizer:
    return ChatTokenizer(tokenizer)


def _trained_spans(tokenizer: Any, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded runs of consecutive unmasked tokens."""
    spans: list[str] = []
    run: list[int] = []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    if run:
        spans.append(tokenizer.decode(run))
    return spans


def test_only_assistant_content_and_end_of_turn_are_trained(tokenizer: Any, chat: ChatTokenizer) -> None:
    messages = (Message("user", "你是谁?"), Message("assistant", "我是一个由 CSDN 迪菲赫尔曼 开发和维护的大语言模型。"))
    encoded = chat.encode(messages, "You are a helpful assistant.")
    assert tokenizer.decode(encoded.input_ids) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n你是谁?<|im_end|>\n"
        "<|im_start|>assistant\n我是一个由 CSDN 迪菲赫尔曼 开发和维护的大语言模型。<|im_end|>\n"
    )
    assert _trained_spans(tokenizer, encoded.input_ids, encoded.labels) == [
        "我是一个由 CSDN 迪菲赫尔曼 开发和维护的大语言模型。<|im_end|>"
    ]
    # The last trained token is the end-of-turn token itself; the newline after it is masked.
    last = max(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
    assert encoded.input_ids[last] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert encoded.labels[last + 1 :] == [IGNORE_INDEX] * (len(encoded.labels) - last - 1)


def test_multi_turn_trains_every_assistant_turn_and_masks_the_rest(tokenizer: Any, chat: ChatTokenizer) -> None:
    messages = (
        Message("system", "Row system."),
        Message("user", "q1"),
        Message("assistant", "a1"),
        Message("user", "q2"),
        Message("assistant", "skip me", train=False),
        Message("user", "q3"),
        Message("assistant", "a3"),
    )
    encoded = chat.encode(messages, "Manifest system (unused: the row has its own).")
    text = tokenizer.decode(encoded.input_ids)
    assert "Row system." in text and "Manifest system" not in text
    assert _trained_spans(tokenizer, encoded.input_ids, encoded.labels) == ["a1<|im_end|>", "a3<|im_end|>"]


def test_no_system_prompt_keeps_the_template_default(tokenizer: Any, chat: ChatTokenizer) -> None:
    encoded = chat.encode((Message("user", "hi"), Message("assistant", "hello")), None)
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(encoded.input_ids)
    assert _trained_spans(tokenizer, encoded.input_ids, encoded.labels) == ["hello<|im_end|>"]


def test_rows_over_max_length_are_dropped_and_counted(chat: ChatTokenizer) -> None:
    short = Example((Message("user", "q"), Message("assistant", "a")), "d", 1)
    long = Example((Message("user", "word " * 200), Message("assistant", "a")), "d", 2)
    muted = Example((Message("user", "q"), Message("assistant", "a", train=False)), "d", 3)
    result = chat.encode_all([short, long, muted, short], "S", max_length=64)
    assert len(result.examples) == 2
    assert result.too_long == 1 and result.longest_dropped > 64
    assert result.nothing_to_train == 1
    assert all(len(e.input_ids) <= 64 for e in result.examples)
