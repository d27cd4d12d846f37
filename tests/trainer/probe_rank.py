"""One gloo rank of test_memory_probe.py's any-rank test: ``python -m tests.trainer.probe_rank SCENARIOS``.

SCENARIOS: ``;``-separated, each one peak in GiB per rank (``,``-separated; ``oom``: the probe runs out of memory).
The probe's measurement is injected (no GPU here); the decision and its all-reduce over the ranks are real.
Prints one JSON line per scenario: this rank's decision.
"""

from __future__ import annotations

import functools
import json
import sys

import torch

from lorafleet_trainer.distributed import Ranks
from lorafleet_trainer.manifest import TrainingSpec
from lorafleet_trainer.memory_probe import decide_gradient_checkpointing

GIB = 2**30
BUDGET = 100 * GIB


def measurement(peak: str) -> int:
    if peak == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory (the test's)")
    return int(peak) * GIB


def main(scenarios: str) -> None:
    ranks = Ranks.from_environment()
    ranks.start(torch.device("cpu"))  # gloo: the collectives the decision takes are the real ones
    model = torch.nn.Linear(2, 2)
    try:
        for scenario in scenarios.split(";"):
            peak = scenario.split(",")[ranks.rank]
            decision = decide_gradient_checkpointing(
                model,
                TrainingSpec(),
                torch.device("cuda"),  # the probe runs on CUDA only; its measurement is the injected one
                functools.partial(measurement, peak),
                ranks=ranks,
                budget_bytes=BUDGET,
            )
            print(json.dumps({"rank": ranks.rank, "enabled": decision.enabled, "why": decision.why}), flush=True)
    finally:
        ranks.stop()


if __name__ == "__main__":
    main(sys.argv[1])
