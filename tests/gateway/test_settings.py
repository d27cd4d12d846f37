"""GatewaySettings reads its env the documented way."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lorafleet_gateway.settings import GatewaySettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("LORAFLEET_"):
            monkeypatch.delenv(name)


def test_env_names_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_ADMIN_KEY", "s3cret-key")
    monkeypatch.setenv("LORAFLEET_GATEWAY_INFERENCE_TARGETS", " 10.0.0.1:50051, inference-1.svc:50051 ,")
    monkeypatch.setenv("LORAFLEET_GATEWAY_FIRST_TOKEN_TIMEOUT_S", "12.5")
    monkeypatch.setenv("LORAFLEET_BASE_MODEL", "Qwen/Qwen2.5-7B-Instruct")
    settings = GatewaySettings()  # type: ignore[call-arg]
    assert settings.admin_key.get_secret_value() == "s3cret-key"
    assert "s3cret-key" not in repr(settings)
    assert settings.inference_targets == ["10.0.0.1:50051", "inference-1.svc:50051"]
    assert settings.first_token_timeout_s == 12.5
    assert settings.base_model == "Qwen/Qwen2.5-7B-Instruct"
    assert (settings.host, settings.port, settings.trainer_target) == ("127.0.0.1", 8000, "127.0.0.1:50061")
    assert settings.resolved_database_url() == f"sqlite:///{(settings.home / 'gateway.db').resolve()}"
    assert (settings.default_rpm_limit, settings.default_tpm_limit) == (None, None)


def test_dns_targets_database_url_and_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_ADMIN_KEY", "k")
    monkeypatch.setenv("LORAFLEET_GATEWAY_INFERENCE_TARGETS", "dns:///inference.ns.svc.cluster.local:50051,10.0.0.9:1")
    monkeypatch.setenv("LORAFLEET_GATEWAY_DATABASE_URL", "postgresql+psycopg://u:pw@db:5432/gateway")
    monkeypatch.setenv("LORAFLEET_GATEWAY_DEFAULT_RPM_LIMIT", "600")
    monkeypatch.setenv("LORAFLEET_GATEWAY_DEFAULT_TPM_LIMIT", "100000")
    settings = GatewaySettings()  # type: ignore[call-arg]
    assert settings.inference_targets == ["dns:///inference.ns.svc.cluster.local:50051", "10.0.0.9:1"]
    assert settings.resolved_database_url() == "postgresql+psycopg://u:pw@db:5432/gateway"
    assert "pw" not in repr(settings)  # the database password stays out of logs
    assert (settings.default_rpm_limit, settings.default_tpm_limit) == (600, 100_000)


def test_json_list_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_ADMIN_KEY", "k")
    monkeypatch.setenv("LORAFLEET_GATEWAY_INFERENCE_TARGETS", '["a:1", "b:2"]')
    assert GatewaySettings().inference_targets == ["a:1", "b:2"]  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LORAFLEET_ADMIN_KEY": "   "},
        {"LORAFLEET_ADMIN_KEY": "k", "LORAFLEET_GATEWAY_INFERENCE_TARGETS": "no-port"},
        {"LORAFLEET_ADMIN_KEY": "k", "LORAFLEET_GATEWAY_INFERENCE_TARGETS": "dns:///no-port"},
        {"LORAFLEET_ADMIN_KEY": "k", "LORAFLEET_GATEWAY_DEFAULT_RPM_LIMIT": "0"},
    ],
)
def test_invalid_settings_refused(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        GatewaySettings()  # type: ignore[call-arg]
