"""Save the trained adapter in the serving format, describe it, and publish it."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorafleet_common.adapters import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterMetadata,
    check_adapter_config,
    check_weight_names,
    load_config_file,
    publish_adapter,
    sha256_file,
)
from lorafleet_common.store import ObjectStore, StoreUnavailable

log = logging.getLogger(__name__)

TRAINING_LOG_FILE = "training_log.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
# A trained adapter outlives a store outage this long (retried with backoff) before its job fails: the
# training it holds costs far more than the wait. Bounded, so a store that never comes back ends the job.
PUBLISH_RETRY_S = 600.0
PUBLISH_BACKOFF_S = (1.0, 30.0)  # first wait, longest wait (doubling in between)


class UnservableAdapter(RuntimeError):
    """The saved adapter breaks a serving rule (should not happen: the manifest was checked at submit)."""


class PublishFailed(RuntimeError):
    """The object store stayed unreachable for the whole retry period; the message is the job's reason."""


def publish_with_retry(
    store: ObjectStore,
    folder: Path,
    metadata: AdapterMetadata,
    warn: Callable[[str], None],
    *,
    give_up_after_s: float = PUBLISH_RETRY_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """``publish_adapter``, retried with exponential backoff while the store is unreachable.

    Publishing is idempotent (the version's files are rewritten, LATEST last), so a retry after a
    half-done attempt is safe. Only StoreUnavailable is retried: any other error will not go away.
    ``warn`` reports each failed attempt (a job event), so the job shows why it has not finished.
    """
    deadline = clock() + give_up_after_s
    wait, longest = PUBLISH_BACKOFF_S
    attempt = 1
    while True:
        try:
            return publish_adapter(store, folder, metadata)
        except StoreUnavailable as exc:
            left = deadline - clock()
            if left <= 0:
                raise PublishFailed(
                    f"the adapter {metadata.name}@{metadata.version} could not be published: the object store "
                    f"stayed unreachable for {give_up_after_s:.0f} s ({attempt} attempts): {exc}"
                ) from exc
            pause = min(wait, left)
            warn(f"warning: publishing failed (attempt {attempt}), retrying in {pause:.0f} s: {exc}")
            sleep(pause)
            wait, attempt = min(wait * 2, longest), attempt + 1


def save_adapter(model: Any, folder: Path, max_rank: int, base_model: str) -> dict[str, Any]:
    """Write adapter_model.safetensors + adapter_config.json; return the config after checking it is servable."""
    from safetensors import safe_open

    model.save_pretrained(folder, safe_serialization=True)
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's generic model card says nothing about this adapter
    config = load_config_file(folder / CONFIG_FILE)
    # Pin what serving requires, whatever this PEFT version's defaults are; name the base model by its id,
    # not by this machine's cache folder.
    config.update({"bias": "none", "use_dora": False, "modules_to_save": None, "base_model_name_or_path": base_model})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as weights:
        names = list(weights.keys())
    problems = check_adapter_config(config, max_rank=max_rank) + check_weight_names(names)
    if problems:
        raise UnservableAdapter("the trained adapter cannot be served: " + "; ".join(problems))
    return config


def write_training_log(folder: Path, history: list[dict[str, float]]) -> None:
    """Per-step metrics as JSON lines, and a loss-curve PNG when matplotlib is installed."""
    with (folder / TRAINING_LOG_FILE).open("w") as fh:
        for record in history:
            fh.write(json.dumps(record) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot([r["step"] for r in history], [r["loss"] for r in history])
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    axes.set_yscale("log")
    figure.tight_layout()
    figure.savefig(folder / LOSS_CURVE_FILE, dpi=100)
    plt.close(figure)


def target_module_names(config: dict[str, Any]) -> list[str]:
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return [targets]
    return sorted(str(t) for t in targets or [])


def build_metadata(
    *,
    job_id: str,
    manifest: Any,
    config: dict[str, Any],
    folder: Path,
    final_loss: float,
    datasets: list[dict[str, Any]],
    extra: dict[str, Any],
) -> AdapterMetadata:
    hyperparameters = manifest.training.model_dump() | {
        "lora_dropout": manifest.lora.dropout,
        "target_modules_requested": manifest.lora.target_modules,
    }
    return AdapterMetadata(
        name=manifest.adapter_name,
        version=job_id,
        base_model=manifest.base_model,
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        target_modules=target_module_names(config),
        sha256=sha256_file(folder / WEIGHTS_FILE),
        system_prompt=manifest.system_prompt,
        job_id=job_id,
        final_loss=final_loss,
        hyperparameters=hyperparameters,
        datasets=datasets,
        **extra,
    )
