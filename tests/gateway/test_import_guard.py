"""The gateway never pulls in the ML stack, and refuses to start without an admin key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

GUARD = """
import sys
from prometheus_client import CollectorRegistry
from lorafleet_common.store import LocalStore
import lorafleet_gateway.main
from lorafleet_gateway.app import create_app
from lorafleet_gateway.deps import GatewayDeps
from lorafleet_gateway.settings import GatewaySettings

settings = GatewaySettings(admin_key="k" * 16, home=sys.argv[1])
app = create_app(settings, GatewayDeps(store=LocalStore(settings.home / "store"), registry=CollectorRegistry()))
assert app.routes
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "vllm"))
assert not heavy, heavy
print("clean")
"""


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    env["LORAFLEET_HOME"] = str(tmp_path)
    return env


def test_gateway_imports_no_ml_stack(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", GUARD, str(tmp_path)], capture_output=True, text=True, env=_env(tmp_path), timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"


def test_refuses_to_start_without_admin_key(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lorafleet_gateway"], capture_output=True, text=True, env=_env(tmp_path), timeout=60
    )
    assert result.returncode == 2
    assert "LORAFLEET_ADMIN_KEY is not set" in result.stderr
