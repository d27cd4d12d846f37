"""Write docs/configuration.md from the services' settings classes: `python tools/gen_config_doc.py`."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from lorafleet_common.settings import CommonSettings
from lorafleet_gateway.settings import GatewaySettings
from lorafleet_inference.settings import InferenceSettings
from lorafleet_trainer.settings import TrainerSettings

OUT = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def env_names(cls: type[BaseSettings], name: str) -> list[str]:
    field = cls.model_fields[name]
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(a) for a in alias.choices]
    if isinstance(alias, str):
        return [alias]
    return [f"{cls.model_config.get('env_prefix', '')}{name}".upper()]


def table(cls: type[BaseSettings], skip: set[str]) -> list[str]:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        if field.is_required():
            default = "(required)"
        elif field.default_factory is not None:
            default = repr(field.default_factory())  # type: ignore[call-arg]
        else:
            default = repr(field.default)
        default = default.replace(str(Path.home()), "~")
        if "key" in name or "secret" in name or "password" in name:
            default = "(unset)" if field.default is None or not field.is_required() else default
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{'`, `'.join(env_names(cls, name))}` | `{default}` | {description} |")
    return rows


def render() -> str:
    common = set(CommonSettings.model_fields)
    parts = [
        "# Configuration",
        "",
        "Every service reads environment variables through one pydantic-settings class, built once at",
        "start-up. This page is generated from those classes by `python tools/gen_config_doc.py`; a test",
        "fails when it is out of date.",
        "",
        "## Shared by all services",
        "",
        *table(CommonSettings, set()),
    ]
    for title, cls in (("Gateway", GatewaySettings), ("Inference", InferenceSettings), ("Trainer", TrainerSettings)):
        parts += ["", f"## {title}", "", *table(cls, common)]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    sys.exit(0)
