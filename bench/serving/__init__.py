"""The GPU serving benchmark (bench/gpu_serving.py): model folders, adapters, the service stack, load, probes."""
