"""Fixtures for the deployment artefacts: the compose CLI and a real Helm engine.

The tools are real: Debian's docker-compose (1.29, validates offline with `config`), Helm's Go engine
through helm-python-sdk, and kubernetes-validate's Kubernetes schemas. A test skips only when its
tool is not installed, and says how to install it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.deploy.manifest_checks import Rendered

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "lorafleet"
DEPLOY_DIR = REPO_ROOT / "deploy"
COMPOSE_FILE = DEPLOY_DIR / "docker-compose.yml"

INSTALL_HINT = "apt-get install -y docker-compose; pip install helm-python-sdk==0.2.2 kubernetes-validate==1.37.0"

Render = Callable[[dict[str, Any]], list[Rendered]]


@pytest.fixture(scope="session")
def compose_bin() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.skip(f"docker-compose is not installed ({INSTALL_HINT})")
    return path


@pytest.fixture(scope="session")
def helm_engine() -> ModuleType:
    try:
        import helm_python
    except ImportError:
        pytest.skip(f"helm-python-sdk (Helm's Go engine) is not installed ({INSTALL_HINT})")
    return helm_python


@pytest.fixture(scope="session")
def k8s_validate() -> ModuleType:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip(f"kubernetes-validate is not installed ({INSTALL_HINT})")
    return kubernetes_validate


@pytest.fixture(scope="session")
def render_chart(helm_engine: ModuleType) -> Iterator[Render]:
    """Render helm/lorafleet like `helm template demo helm/lorafleet -n fleet` (NOTES.txt left out)."""
    chart = helm_engine.Chart.load(CHART_DIR)

    def render(values: dict[str, Any]) -> list[Rendered]:
        rendered: dict[str, str] = chart.render(values, name="demo", namespace="fleet", is_install=True)
        out: list[Rendered] = []
        for path, text in sorted(rendered.items()):
            if path.endswith("NOTES.txt"):
                continue
            template = path.split("/templates/", 1)[1]
            out.extend(Rendered(template, doc) for doc in yaml.safe_load_all(text) if doc)
        return out

    yield render
    chart.close()


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())
