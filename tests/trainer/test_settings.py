"""Settings come from LORAFLEET_TRAINER_* plus the shared LORAFLEET_* variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet_trainer.settings import TrainerSettings


def test_defaults_derive_from_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path))
    settings = TrainerSettings()
    assert settings.grpc_port == 50061 and settings.metrics_port == 9102 and settings.host == "127.0.0.1"
    assert settings.serving_max_lora_rank == 16 and settings.torch_threads == 0
    assert settings.resolved_database_url() == f"sqlite:///{tmp_path.resolve()}/trainer.db"
    assert settings.resolved_work_dir() == (tmp_path / "jobs").resolve()
    assert settings.model_cache_dir == tmp_path / "models"


def test_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_TRAINER_GRPC_PORT", "6000")
    monkeypatch.setenv("LORAFLEET_TRAINER_METRICS_PORT", "0")
    monkeypatch.setenv("LORAFLEET_TRAINER_SERVING_MAX_LORA_RANK", "64")
    monkeypatch.setenv("LORAFLEET_TRAINER_DATABASE_URL", "postgresql://db/trainer")
    monkeypatch.setenv("LORAFLEET_TRAINER_TORCH_THREADS", "2")
    monkeypatch.setenv("LORAFLEET_STORE_URL", "s3://bucket/prefix")
    settings = TrainerSettings()
    assert (settings.grpc_port, settings.metrics_port, settings.serving_max_lora_rank) == (6000, 0, 64)
    assert settings.resolved_database_url() == "postgresql://db/trainer" and settings.torch_threads == 2
    assert settings.resolved_store_url() == "s3://bucket/prefix"
