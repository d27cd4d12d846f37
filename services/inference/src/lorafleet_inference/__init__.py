"""LoRA Fleet inference: one vLLM engine, a base model and many hot-loaded LoRA adapters, served over gRPC."""
