"""lorafleet_gpu_memory_{used,total}_bytes, read at scrape time.

With NVIDIA GPUs and the ``nvidia-ml-py`` package (NVML): per device, as nvidia-smi
reports it (device="0", "1", ...). Otherwise (the CPU build of vLLM): device="cpu",
used = resident memory of this process and its children (vLLM's engine core and
workers hold the weights and the KV cache there), total = the machine's memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class MemoryCollector(Collector):
    """Accelerator memory per device (NVML), or the process tree's memory on a CPU-only host."""

    def __init__(self) -> None:
        self._nvml: Any = _init_nvml()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        used = GaugeMetricFamily(
            "lorafleet_gpu_memory_used_bytes",
            "Accelerator memory in use per device (NVML); on a CPU-only host, device=cpu: RSS of the replica's "
            "processes.",
            labels=["device"],
        )
        total = GaugeMetricFamily(
            "lorafleet_gpu_memory_total_bytes",
            "Accelerator memory per device (NVML); on a CPU-only host, device=cpu: the machine's memory.",
            labels=["device"],
        )
        try:
            for device, (used_bytes, total_bytes) in self.readings().items():
                used.add_metric([device], used_bytes)
                total.add_metric([device], total_bytes)
        except Exception:  # a scrape must not fail because a reading did
            log.warning("memory reading failed", exc_info=True)
        yield used
        yield total

    def readings(self) -> dict[str, tuple[float, float]]:
        """{device: (used bytes, total bytes)}."""
        if self._nvml is not None:
            nvml = self._nvml
            result = {}
            for index in range(nvml.nvmlDeviceGetCount()):
                info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index))
                result[str(index)] = (float(info.used), float(info.total))
            return result
        return {"cpu": _process_tree_memory()}


def _init_nvml() -> Any:
    try:
        import pynvml  # the nvidia-ml-py package

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() > 0:
            return pynvml
    except Exception:  # not installed, no driver, no device: fall back to the CPU readings
        return None
    return None


def _process_tree_memory() -> tuple[float, float]:
    import psutil

    me = psutil.Process()
    used = 0
    for proc in (me, *me.children(recursive=True)):
        try:
            used += proc.memory_info().rss
        except psutil.Error:  # a child that just exited
            continue
    return float(used), float(psutil.virtual_memory().total)
