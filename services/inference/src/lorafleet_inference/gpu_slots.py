"""The GPU tier as the service can know it: a mirror of vLLM's LRU over its ``max_loras`` slots.

vLLM (0.26 and 0.32 alike) activates an adapter into a GPU slot when ``add_lora``
registers it and whenever a scheduled batch uses it, evicting the least recently
activated adapter when all slots are taken (``LRUCacheWorkerLoRAManager``). That
happens inside the engine's worker process, and no API both versions share reports
slot residency, so the service replays the same policy on the events it sees:
a registration and the admission of a request. It is exact for one request at a
time; under concurrency the engine activates in batch order, which can differ
from admission order by a step.
"""

from __future__ import annotations

from collections import OrderedDict


class GpuSlots:
    """LRU of the adapters (``name@version``) that occupy the engine's LoRA slots."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._slots: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def keys(self) -> list[str]:
        """Adapters in a slot, least recently used first."""
        return list(self._slots)

    def activate(self, key: str) -> str | None:
        """``key`` is used now; returns the adapter it pushed out of its slot, if any."""
        if key in self._slots:
            self._slots.move_to_end(key)
            return None
        evicted = None
        if len(self._slots) >= self.capacity:
            evicted, _ = self._slots.popitem(last=False)
        self._slots[key] = None
        return evicted

    def discard(self, key: str) -> None:
        """The adapter left the engine (``remove_lora`` frees its slot too)."""
        self._slots.pop(key, None)
