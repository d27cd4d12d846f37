"""What the services say about themselves during the run: Prometheus scrapes, and nvidia-smi to check them."""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, key: str = "") -> Series:
    """Every sample of a /metrics page (``key``: a Bearer token, the gateway's admin key)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(url, headers=headers, timeout=10)
    response.raise_for_status()
    text = response.text
    series: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return series


def total(series: Series, name: str, **labels: str) -> float:
    """Sum of every sample named ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, lbls), v in series.items() if n == name and wanted <= set(lbls))


def nvidia_smi() -> dict[str, float] | None:
    """Used and total memory of GPU 0 in bytes, and its utilization, as nvidia-smi reports them."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used,memory.total,utilization.gpu", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.splitlines()[0]
        used, tot, util = (float(x) for x in out.split(","))
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        return None
    return {"used_bytes": used * 2**20, "total_bytes": tot * 2**20, "util_pct": util}


class Sampler:
    """Every ``interval_s`` in a thread: the replica's GPU memory metric next to nvidia-smi's reading, and its
    token counter, so a pass can be compared with what the service reported meanwhile."""

    def __init__(self, metrics_url: str, interval_s: float = 1.0) -> None:
        self.metrics_url = metrics_url
        self.interval_s = interval_s
        self.rows: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.rows.append(self.read())
            except (httpx.HTTPError, OSError) as exc:  # the run goes on; the check reports fewer samples
                self.errors.append(repr(exc)[:200])
            self._stop.wait(self.interval_s)

    def read(self) -> dict[str, Any]:
        smi = nvidia_smi()
        series = scrape(self.metrics_url)
        device = "0" if total(series, "lorafleet_gpu_memory_total_bytes", device="0") else "cpu"
        return {
            "t": time.time(),
            "metric_gpu_used_bytes": total(series, "lorafleet_gpu_memory_used_bytes", device=device),
            "metric_device": device,
            "smi_used_bytes": smi["used_bytes"] if smi else None,
            "smi_util_pct": smi["util_pct"] if smi else None,
            "generation_tokens": total(series, "lorafleet_generation_tokens_total"),
        }

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
