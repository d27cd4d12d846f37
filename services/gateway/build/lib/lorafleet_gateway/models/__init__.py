"""GET /v1/models and resolving a request's `model` to the base model or an adapter."""
