"""LoRA Fleet gateway: OpenAI-compatible HTTP API over the inference replicas and the trainer (no torch)."""
