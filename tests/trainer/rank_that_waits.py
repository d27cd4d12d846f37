"""A torchrun rank that only waits to be stopped: the signal tests of test_data_parallel_jobs.py run it."""

from __future__ import annotations

import os
import sys
import time

from lorafleet_trainer.distributed import die_with_parent

if __name__ == "__main__":
    die_with_parent()  # what every worker rank does first
    print(f"rank {os.environ['RANK']} pid {os.getpid()} waiting", file=sys.stderr, flush=True)
    time.sleep(300)
