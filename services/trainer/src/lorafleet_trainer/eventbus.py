"""Wakes job watchers when events are recorded (they then re-read the database)."""

from __future__ import annotations

import asyncio
import contextlib


class EventBus:
    """Tells watchers that some job has new events (they re-read the database)."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self.generation = 0

    async def publish(self) -> None:
        async with self._changed:
            self.generation += 1
            self._changed.notify_all()

    async def wait(self, seen: int, timeout: float) -> None:
        """Return once ``generation`` differs from ``seen``, or after ``timeout``."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: self.generation != seen), timeout)
