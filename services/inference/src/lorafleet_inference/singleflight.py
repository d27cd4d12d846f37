"""Single flight: concurrent callers asking for the same work share one run of it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class SingleFlight:
    """Runs ``start()`` once per key for all concurrent callers; a caller that goes away does not cancel it."""

    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Task[Any]] = {}

    def in_flight(self) -> list[str]:
        """Keys with work in flight."""
        return list(self._inflight)

    async def run(self, key: str, start: Callable[[], Awaitable[T]]) -> T:
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(start())
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._finish(key, t))
        # shield: a caller that is cancelled stops waiting; the shared work goes on for the others.
        result: T = await asyncio.shield(task)
        return result

    def _finish(self, key: str, task: asyncio.Task[Any]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: waiters may all have gone away
