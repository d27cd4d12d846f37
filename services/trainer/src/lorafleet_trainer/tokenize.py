"""Conversations → token ids and labels, through the base model's own chat template.

The loss covers each trainable assistant turn's content and its end-of-turn
token (``<|im_end|>`` on ChatML); the system turn, user turns and each
assistant header are masked with -100. Nothing is hand-written per template:
the conversation is rendered prefix by prefix and the token ids are diffed, so
whatever the template adds around a reply (headers, defaults) stays masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lorafleet_trainer.datasets import Example, Message

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class TokenizeResult:
    examples: list[TokenizedExample]
    too_long: int
    nothing_to_train: int
    longest_dropped: int


class TemplateError(ValueError):
    """The tokenizer's chat template cannot be used for training."""


def with_system_prompt(messages: Sequence[Message], system_prompt: str | None) -> list[dict[str, str]]:
    """Chat-template messages; the row's own system turn wins over the manifest's prompt.

    An empty prompt counts as none, as in the inference service's rendering: both then leave the
    template's default in place (Qwen2.5 injects its own), so training and serving match.
    """
    rendered = [{"role": m.role, "content": m.content} for m in messages]
    if system_prompt and (not rendered or rendered[0]["role"] != "system"):
        rendered.insert(0, {"role": "system", "content": system_prompt})
    return rendered


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class ChatTokenizer:
    """Tokenizes conversations with a Hugging Face tokenizer's chat template."""

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("the base model's tokenizer has no chat template; train an instruct/chat model")
        self.tokenizer = tokenizer
        # End-of-turn markers are special tokens, whether or not the tokenizer lists them among its named ones.
        self.special_ids = set(tokenizer.all_special_ids)
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special_ids |= {int(i) for i, token in decoder.items() if getattr(token, "special", False)}
        if tokenizer.eos_token_id is not None:
            self.special_ids.add(int(tokenizer.eos_token_id))

    def _ids(self, messages: list[dict[str, str]], *, generation_prompt: bool = False) -> list[int]:
        if not messages:
            return []
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, messages: Sequence[Message], system_prompt: str | None) -> TokenizedExample:
        """Token ids of the whole conversation and labels that train only the assistant replies."""
        chat = with_system_prompt(messages, system_prompt)
        offset = len(chat) - len(messages)  # 1 when the manifest's system prompt was inserted
        full = self._ids(chat)
        labels = [IGNORE_INDEX] * len(full)
        for index, message in enumerate(messages):
            if message.role != "assistant" or not message.train:
                continue
            position = index + offset
            # Where the reply starts: after the prompt the template renders for generation.
            start = _common_prefix(self._ids(chat[:position], generation_prompt=True), full)
            end = _common_prefix(self._ids(chat[: position + 1]), full)
            end = self._through_end_of_turn(full, start, end)
            labels[start:end] = full[start:end]
        return TokenizedExample(full, labels)

    def _through_end_of_turn(self, ids: list[int], start: int, end: int) -> int:
        """Cut what follows the reply's end-of-turn token (the template's trailing newline)."""
        for i in range(end - 1, start - 1, -1):
            if ids[i] in self.special_ids:
                return i + 1
        return end  # a template with no end-of-turn token: train the whole rendered turn

    def encode_all(self, examples: Sequence[Example], system_prompt: str | None, max_length: int) -> TokenizeResult:
        """Encode every example; rows longer than max_length or with nothing to train are dropped and counted."""
        kept: list[TokenizedExample] = []
        too_long = nothing = longest = 0
        for example in examples:
            encoded = self.encode(example.messages, system_prompt)
            if len(encoded.input_ids) > max_length:
                too_long += 1
                longest = max(longest, len(encoded.input_ids))
            elif encoded.trained_tokens == 0:
                nothing += 1
            else:
                kept.append(encoded)
        return TokenizeResult(kept, too_long, nothing, longest)
