"""docs/metrics.md lists exactly the series each service's registry exposes: names, types and label names."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
Series = dict[str, tuple[str, list[str]]]  # name as scraped (counters with _total) -> (type, sorted label names)


def documented(heading: str) -> Series:
    """The tables of the ``## <heading>`` section."""
    section = DOC.read_text().split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(lorafleet_\w+)` \| (\w+) \| ([^|]*) \|", section, re.MULTILINE)
    return {name: (kind, sorted(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}


def exposed(metrics: Any) -> Series:
    """What ``metrics.registry`` exposes; the label names of metrics with no child yet come from their declaration."""
    declared = {m._name: set(m._labelnames) for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}
    found = {}
    for family in metrics.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {k for s in family.samples for k in s.labels if k != "le"} | declared.get(family.name, set())
        found[name] = (family.type, sorted(labels))
    return found


def inference_metrics() -> Any:
    from lorafleet_inference.metrics import InferenceMetrics

    return InferenceMetrics()


def gateway_metrics() -> Any:
    from lorafleet_gateway.metrics import GatewayMetrics

    return GatewayMetrics(CollectorRegistry())


def trainer_metrics() -> Any:
    from lorafleet_trainer.metrics import TrainerMetrics

    return TrainerMetrics()


@pytest.mark.parametrize(
    ("heading", "build"),
    [("Inference", inference_metrics), ("Gateway", gateway_metrics), ("Trainer", trainer_metrics)],
)
def test_every_metric_is_documented_in_docs_metrics_md(heading: str, build: Callable[[], Any]) -> None:
    series = exposed(build())
    assert series, "the service exposes nothing: the test would pass on any table"
    assert documented(heading) == series
