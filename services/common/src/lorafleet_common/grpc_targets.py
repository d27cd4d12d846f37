"""gRPC target lists in settings: ``host:port`` or ``dns:///name:port`` (every address the name resolves to).

Shared by the gateway (its inference replicas) and the trainer (the replicas it preloads published adapters on).
"""

from __future__ import annotations

import json
from typing import Any

DNS_SCHEME = "dns:///"


def split_targets(value: Any) -> Any:
    """A comma-separated string or a JSON list (as environment variables carry them) → a list; others unchanged."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def check_targets(targets: list[str]) -> list[str]:
    """The targets, or ValueError naming the first one that is not ``host:port`` or ``dns:///name:port``."""
    for target in targets:
        host, sep, port = target.removeprefix(DNS_SCHEME).rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f'inference target {target!r} must be "host:port" or "{DNS_SCHEME}name:port"')
    return targets
