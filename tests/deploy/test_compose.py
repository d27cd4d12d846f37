"""deploy/docker-compose.yml checked by the real compose CLI (`docker-compose config`, offline).

`config` interpolates the env file, applies the `${VAR:?message}` checks and validates the file
against the Compose schema. Docker-compose 1.29 prints every service whatever the profile, so which
services a profile starts is computed here with Compose's rule: services without profiles, plus
those listing the active one.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import COMPOSE_FILE, DEPLOY_DIR, REPO_ROOT

SECRETS = ("LORAFLEET_ADMIN_KEY", "LORAFLEET_S3_ACCESS_KEY", "LORAFLEET_S3_SECRET_KEY", "GRAFANA_ADMIN_PASSWORD")
FILLED = {
    "LORAFLEET_ADMIN_KEY": "lf-admin-test",
    "LORAFLEET_S3_ACCESS_KEY": "fleet",
    "LORAFLEET_S3_SECRET_KEY": "fleet-secret",
    "GRAFANA_ADMIN_PASSWORD": "grafana-test",
}
INFRA = {"minio", "minio-init", "prometheus", "grafana"}


def env_file(tmp_path: Path, drop: str = "", **overrides: str) -> Path:
    """deploy/.env.example with its required values filled in (minus `drop`)."""
    lines = []
    for line in (DEPLOY_DIR / ".env.example").read_text().splitlines():
        key = line.split("=", 1)[0]
        if key == drop:
            continue
        if key in FILLED or key in overrides:
            line = f"{key}={overrides.get(key, FILLED.get(key))}"
        lines.append(line)
    path = tmp_path / "test.env"
    path.write_text("\n".join(lines) + "\n")
    return path


def compose(compose_bin: str, env: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # A clean environment: nothing from the caller's shell may satisfy a ${VAR:?} check.
    return subprocess.run(
        [compose_bin, "-f", str(COMPOSE_FILE), "--env-file", str(env), *args],
        cwd=REPO_ROOT,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(env.parent)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def config(compose_bin: str, env: Path, *args: str) -> dict[str, Any]:
    result = compose(compose_bin, env, *args, "config")
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = yaml.safe_load(result.stdout)
    return parsed


def active(services: dict[str, Any], profile: str) -> dict[str, Any]:
    return {name: svc for name, svc in services.items() if not svc.get("profiles") or profile in svc["profiles"]}


def test_default_env_file_brings_up_the_gpu_stack(compose_bin: str, tmp_path: Path) -> None:
    services = config(compose_bin, env_file(tmp_path))["services"]
    running = active(services, "gpu")  # COMPOSE_PROFILES=gpu in .env.example
    assert set(running) == INFRA | {"inference", "trainer", "gateway"}
    devices = running["inference"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    assert running["inference"]["environment"]["LORAFLEET_BASE_MODEL"] == "Qwen/Qwen2.5-7B-Instruct"
    assert running["gateway"]["environment"]["LORAFLEET_ADMIN_KEY"] == "lf-admin-test"
    assert str(running["gateway"]["environment"]["LORAFLEET_GATEWAY_WORKERS"]) == "1"
    assert running["gateway"]["ports"][0] == "127.0.0.1:8000:8000/tcp"
    assert running["trainer"]["environment"]["LORAFLEET_TRAINER_NOTIFY_INFERENCE"] == "inference:50051"


def test_cpu_profile_swaps_in_the_cpu_images_and_embedded_model(compose_bin: str, tmp_path: Path) -> None:
    services = config(compose_bin, env_file(tmp_path), "--profile", "cpu")["services"]
    running = active(services, "cpu")
    assert set(running) == INFRA | {"inference-cpu", "trainer-cpu", "gateway-cpu"}
    for name in ("inference-cpu", "trainer-cpu", "gateway-cpu"):
        svc = running[name]
        assert svc["environment"]["LORAFLEET_BASE_MODEL"] == "HuggingFaceTB/SmolLM2-135M-Instruct", name
        assert "deploy" not in svc, f"{name} must not reserve a GPU"
        # The copies answer to the plain names, so targets and Prometheus need no change.
        assert svc["networks"]["default"]["aliases"] == [name.removesuffix("-cpu")]
    assert running["inference-cpu"]["image"] == "lorafleet/inference:0.1.0-cpu"
    assert running["inference-cpu"]["build"]["dockerfile"] == "deploy/docker/inference-cpu.Dockerfile"


def test_gateway_workers_come_from_the_env_file(compose_bin: str, tmp_path: Path) -> None:
    services = config(compose_bin, env_file(tmp_path, LORAFLEET_GATEWAY_WORKERS="4"), "--profile", "cpu")["services"]
    for name in ("gateway", "gateway-cpu"):
        assert str(services[name]["environment"]["LORAFLEET_GATEWAY_WORKERS"]) == "4", name


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_startup_is_gated_on_health_within_the_profile(compose_bin: str, tmp_path: Path, profile: str) -> None:
    running = active(config(compose_bin, env_file(tmp_path), "--profile", profile)["services"], profile)
    for name, svc in running.items():
        if name != "minio-init":
            assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for dependency, condition in svc.get("depends_on", {}).items():
            assert dependency in running, f"{name} depends on {dependency}, which profile {profile} does not start"
            assert condition["condition"] in ("service_healthy", "service_completed_successfully")
    ports = [p for svc in running.values() for p in svc.get("ports", [])]
    assert len(ports) == len(set(ports)), "two services of one profile publish the same port"


@pytest.mark.parametrize("secret", SECRETS)
def test_a_missing_secret_stops_compose_naming_it(compose_bin: str, tmp_path: Path, secret: str) -> None:
    result = compose(compose_bin, env_file(tmp_path, drop=secret), "config")
    assert result.returncode != 0
    assert f"set {secret} in deploy/.env" in result.stderr


def test_the_unfilled_example_is_rejected(compose_bin: str, tmp_path: Path) -> None:
    example = tmp_path / "example.env"
    example.write_text((DEPLOY_DIR / ".env.example").read_text())
    result = compose(compose_bin, example, "config")
    assert result.returncode != 0
    assert "deploy/.env" in result.stderr


def test_caches_and_state_live_in_named_volumes(compose_bin: str, tmp_path: Path) -> None:
    parsed = config(compose_bin, env_file(tmp_path))
    assert {"model-cache", "adapter-cache", "trainer-state", "minio-data"} <= set(parsed["volumes"])
    mounts = dict(volume_mount(m) for m in parsed["services"]["inference"]["volumes"])
    assert mounts == {"model-cache": "/var/lib/lorafleet/models", "adapter-cache": "/var/lib/lorafleet/adapters"}


def volume_mount(mount: str | dict[str, str]) -> tuple[str, str]:
    """(source, target) of a mount in compose v1's short or v2's long `config` output."""
    if isinstance(mount, dict):
        return mount["source"], mount["target"]
    source, target = mount.split(":")[:2]
    return source, target


def test_prometheus_scrapes_all_three_services() -> None:
    prometheus = yaml.safe_load((DEPLOY_DIR / "prometheus" / "prometheus.yml").read_text())
    scraped = {
        (name, sd["port"])
        for job in prometheus["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        for name in sd["names"]
    }
    assert {("gateway", 8000), ("inference", 9101), ("trainer", 9102)} <= scraped
