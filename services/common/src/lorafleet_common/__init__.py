"""Shared building blocks of the LoRA Fleet services (no torch, no vLLM)."""
