"""The Grafana provisioning: a datasource and the LoRA Fleet dashboard over the services' metrics."""

from __future__ import annotations

import json
import re
from typing import Any

from tests.deploy.conftest import DEPLOY_DIR, load_yaml

DASHBOARD = DEPLOY_DIR / "grafana" / "dashboards" / "lorafleet.json"

# The metric names the services export (the runtime contract), by what the dashboard must show.
REQUIRED_METRICS = {
    "GPU memory": ["lorafleet_gpu_memory_used_bytes", "lorafleet_gpu_memory_total_bytes"],
    "tokens/s": ["lorafleet_generation_tokens_total", "lorafleet_prompt_tokens_total"],
    "TTFT and ITL": ["lorafleet_time_to_first_token_seconds_bucket", "lorafleet_inter_token_latency_seconds_bucket"],
    "requests by adapter": ["lorafleet_requests_total"],
    "adapter loads and cache": [
        "lorafleet_adapter_loads_total",
        "lorafleet_adapter_cache_hits_total",
        "lorafleet_adapter_cache_misses_total",
        "lorafleet_adapter_load_seconds_bucket",
    ],
    "training": [
        "lorafleet_training_jobs",
        "lorafleet_training_loss",
        "lorafleet_training_tokens_per_second",
        # The trainer exports jobs_finished_total: prometheus_client cannot register lorafleet_training_jobs_total
        # beside the lorafleet_training_jobs gauge (a counter family drops "_total", so the names clash).
        "lorafleet_training_jobs_finished_total",
    ],
    "gateway": [
        "lorafleet_gateway_requests_total",
        "lorafleet_gateway_request_seconds_bucket",
        "lorafleet_gateway_time_to_first_token_seconds_bucket",
    ],
}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_dashboard_shows_every_required_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for p in panels(dashboard) for t in p["targets"])
    used = set(re.findall(r"\blorafleet_\w+", exprs))
    missing = {topic: [m for m in metrics if m not in used] for topic, metrics in REQUIRED_METRICS.items()}
    assert {topic: m for topic, m in missing.items() if m} == {}


def test_dashboard_is_portable_and_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "lorafleet"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        # Every query goes through the datasource variable, so any Prometheus (compose or a cluster's) works.
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    (datasource,) = load_yaml(DEPLOY_DIR / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert (datasource["type"], datasource["url"]) == ("prometheus", "http://prometheus:9090")
    (provider,) = load_yaml(DEPLOY_DIR / "grafana" / "provisioning" / "dashboards" / "lorafleet.yml")["providers"]
    compose = load_yaml(DEPLOY_DIR / "docker-compose.yml")
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
