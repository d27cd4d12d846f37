"""Prompts as token ids, rendered with the base model's own tokenizer and chat template.

The trainer renders training conversations with the same template, so a chat
request here sees exactly the format the adapter was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CHAT_ROLES = frozenset({"system", "user", "assistant"})


class PromptRenderer:
    """Turns raw prompts and chat conversations into token ids."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, model_path: str) -> PromptRenderer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(model_path))

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a raw (completions API) prompt, with the tokenizer's usual special tokens."""
        return list(self.tokenizer(prompt)["input_ids"])

    def render_chat(self, messages: Sequence[dict[str, str]], system_prompt: str | None = None) -> str:
        """The chat as the template renders it, ending with the assistant's turn opener.

        ``system_prompt`` (the adapter's training system prompt) is put first when the
        conversation has no system message of its own, for train/serve parity.
        """
        conversation = list(messages)
        if system_prompt and not any(m["role"] == "system" for m in conversation):
            conversation.insert(0, {"role": "system", "content": system_prompt})
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return str(text)

    def encode_chat(self, messages: Sequence[dict[str, str]], system_prompt: str | None = None) -> list[int]:
        # The template already wrote any BOS/special tokens as text: do not add them twice.
        text = self.render_chat(messages, system_prompt)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
