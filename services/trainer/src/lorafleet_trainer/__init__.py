"""LoRA Fleet trainer: a durable job queue that turns manifests into published LoRA adapters."""
