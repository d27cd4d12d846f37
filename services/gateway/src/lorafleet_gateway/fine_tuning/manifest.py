"""The trainer manifest the gateway writes for an OpenAI fine-tuning request (format: docs/briefs-common.md)."""

from __future__ import annotations

from typing import Any

from lorafleet_common.names import InvalidName, validate_adapter_name
from lorafleet_gateway.errors import InvalidRequest
from lorafleet_gateway.files.service import data_key
from lorafleet_gateway.fine_tuning.schemas import FineTuningJobCreate
from lorafleet_gateway.tenancy.namespace import manifests_prefix

BASE_LEARNING_RATE = 1e-4  # learning_rate_multiplier 1.0
DEFAULT_SEED = 42
JOB_PREFIX = "ftjob-"


def manifest_key(tenant: str, job_id: str) -> str:
    return f"{manifests_prefix(tenant)}{job_id}.json"


def fine_tuned_model_for(base_model: str, tenant: str, suffix: str | None, job_id: str) -> str:
    """ft:<base_short>:<tenant>:<suffix or custom>:<job_short>, the model id the job will publish.

    The tenant's adapter name in the store is "<tenant>/" + this (tenancy/namespace.py).
    """
    base_short = base_model.rstrip("/").rsplit("/", 1)[-1].lower()
    name = f"ft:{base_short}:{tenant}:{suffix or 'custom'}:{job_id.removeprefix(JOB_PREFIX)}"
    try:
        return validate_adapter_name(f"{tenant}/{name}").partition("/")[2]
    except InvalidName as exc:
        raise InvalidRequest(
            f"suffix {suffix!r} would make an invalid model name {name!r}: use letters, digits, '.', '_', '-' "
            "and keep the name within 100 characters",
            param="suffix",
        ) from exc


def training_section(body: FineTuningJobCreate) -> dict[str, Any]:
    """OpenAI hyperparameters in manifest terms, then the lorafleet.training overrides.

    OpenAI's batch_size counts examples per optimizer step, so it becomes a
    per-device batch with no gradient accumulation.
    """
    hp = body.effective_hyperparameters()
    training: dict[str, Any] = {"seed": body.seed if body.seed is not None else DEFAULT_SEED}
    if hp.n_epochs is not None:
        training["epochs"] = hp.n_epochs
    if hp.batch_size is not None:
        training["batch_size"] = hp.batch_size
        training["gradient_accumulation_steps"] = 1
    if hp.learning_rate_multiplier is not None:
        training["learning_rate"] = BASE_LEARNING_RATE * hp.learning_rate_multiplier
    if body.lorafleet and body.lorafleet.training:
        training.update(body.lorafleet.training)
    return training


def dataset_mix(body: FineTuningJobCreate) -> list[dict[str, Any]]:
    """training_file then lorafleet.datasets, each as {file, samples, format}: what the job trains on.

    This is what the job object reports (``lorafleet.datasets``) and what becomes the manifest's datasets.
    """
    options = body.lorafleet
    mix: list[dict[str, Any]] = [
        {"file": body.training_file, "samples": options.training_file_samples if options else None, "format": "auto"}
    ]
    for ref in (options.datasets if options else None) or []:
        mix.append({"file": ref.file, "samples": ref.samples, "format": ref.format})
    return mix


def manifest_datasets(tenant: str, mix: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The manifest's datasets: the tenant's own file keys only (the ids were checked against its files)."""
    datasets = []
    for entry in mix:
        spec: dict[str, Any] = {"uri": data_key(tenant, entry["file"]), "format": entry["format"]}
        if entry["samples"] is not None:
            spec["samples"] = entry["samples"]
        datasets.append(spec)
    return datasets


def reported_hyperparameters(training: dict[str, Any]) -> dict[str, str]:
    """The OpenAI hyperparameters a manifest's training section amounts to, as job labels ("auto" if unknown)."""

    def number(value: Any) -> str:
        return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else "auto"

    lr = training.get("learning_rate")
    batch, accumulation = training.get("batch_size"), training.get("gradient_accumulation_steps")
    effective_batch = batch * accumulation if isinstance(batch, int) and isinstance(accumulation, int) else None
    return {
        "n_epochs": number(training.get("epochs")),
        "batch_size": number(effective_batch),
        "learning_rate_multiplier": number(
            float(f"{lr / BASE_LEARNING_RATE:.6g}") if isinstance(lr, int | float) else None
        ),
        "seed": number(training.get("seed")),
    }


def build_manifest(
    body: FineTuningJobCreate, *, tenant: str, base_model: str, adapter_name: str, labels: dict[str, str]
) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "base_model": base_model,
        "adapter_name": adapter_name,
        "datasets": manifest_datasets(tenant, dataset_mix(body)),
        "training": training_section(body),
        "labels": labels,
    }
    if body.validation_file:  # evaluated whole at the end of each epoch: eval_loss, OpenAI's full_valid_loss
        manifest["validation"] = {"datasets": [{"uri": data_key(tenant, body.validation_file), "format": "auto"}]}
    options = body.lorafleet
    if options and options.lora is not None:
        manifest["lora"] = options.lora
    if options and options.resources is not None:
        manifest["resources"] = options.resources
    if options and options.system_prompt is not None:
        manifest["system_prompt"] = options.system_prompt
    return manifest
