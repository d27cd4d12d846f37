"""Keep what a serving process built at start-up out of Python's full garbage collections (``gc.freeze``).

A full (oldest-generation) collection walks every object the collector tracks, on the thread that triggered it:
in the gateway and the replica that is the event loop streaming every response, so every stream in flight stalls
at once. Importing the gateway alone leaves ~124k such objects (FastAPI, pydantic, SQLAlchemy, gRPC), 63-83 ms per
full collection on a 2-core CI machine; the replica's front end holds torch, transformers and vLLM as well. Those
objects live as long as the process, so walking them finds nothing. Frozen once start-up is done, they are
skipped, and a full collection only walks what requests created since. vLLM does the same in its GPU worker, not
in the process that serves.

Only entry points call this (``python -m lorafleet_gateway``, ``python -m lorafleet_inference``): a test process
that starts many apps keeps its collector as it was.
"""

from __future__ import annotations

import gc
import logging
import time


def freeze_startup_heap(logger: logging.Logger) -> int:
    """Collect once, then freeze every object still alive; returns how many are frozen now."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info(
        "start-up heap frozen for the garbage collector: %d objects (%.0f ms)",
        frozen,
        (time.perf_counter() - started) * 1e3,
    )
    return frozen
