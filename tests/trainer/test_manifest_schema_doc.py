"""docs/manifest.schema.json is generated from the trainer's manifest model: it must not drift."""

from __future__ import annotations

import json
from pathlib import Path

from lorafleet_trainer.manifest import JobManifest

SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "manifest.schema.json"


def test_published_schema_matches_the_model() -> None:
    assert json.loads(SCHEMA.read_text()) == JobManifest.model_json_schema(), (
        "regenerate: python -c 'import json; from lorafleet_trainer.manifest import JobManifest; "
        "print(json.dumps(JobManifest.model_json_schema(), indent=2, ensure_ascii=False))' > docs/manifest.schema.json"
    )
