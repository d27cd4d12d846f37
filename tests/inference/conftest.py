"""Fixtures of the inference suite (helpers live in inference_helpers.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lorafleet_common.store import LocalStore
from tests.inference.inference_helpers import write_adapter_dir


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(10_000))

    def make(**kwargs: Any) -> Path:
        return write_adapter_dir(tmp_path / f"adapter-{next(counter)}", **kwargs)

    return make


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")
