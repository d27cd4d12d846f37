"""The training benchmarks (bench/trainer.py, bench/seeds_workload.py): random-weight models, synthetic rows."""
