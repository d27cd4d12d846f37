"""Where adapters live in object storage, what their metadata says, and the
rules an adapter must meet to be served.

Layout (all keys relative to the store)::

    adapters/<name>/versions/<version>/adapter_model.safetensors
    adapters/<name>/versions/<version>/adapter_config.json
    adapters/<name>/versions/<version>/metadata.json     <- written last
    adapters/<name>/LATEST                               <- the version to serve

A version exists once its metadata.json exists; ``LATEST`` moves only after
that. Readers that go through ``LATEST`` or metadata therefore never see half
an adapter.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lorafleet_common.names import AdapterRef, validate_adapter_name, validate_version
from lorafleet_common.store import ObjectNotFound, ObjectStore

ADAPTERS_PREFIX = "adapters"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
METADATA_FILE = "metadata.json"
ADAPTER_FILES = (WEIGHTS_FILE, CONFIG_FILE, METADATA_FILE)

# The projection names vLLM can apply LoRA to on Llama/Qwen2-family models.
SUPPORTED_TARGET_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


class AdapterNotFound(LookupError):
    """No published adapter (or version) by that name."""


class AdapterMetadata(BaseModel):
    """metadata.json: what the trainer knew when it published the adapter."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: str
    base_model: str = Field(description="Base model id the adapter was trained on.")
    rank: int
    alpha: float
    target_modules: list[str]
    sha256: str = Field(description="sha256 of adapter_model.safetensors, hex.")
    system_prompt: str | None = None
    job_id: str | None = None
    final_loss: float | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    datasets: list[dict[str, Any]] = Field(default_factory=list)
    created_at: float = Field(default_factory=time.time)


def version_prefix(name: str, version: str) -> str:
    return f"{ADAPTERS_PREFIX}/{validate_adapter_name(name)}/versions/{validate_version(version)}"


def latest_key(name: str) -> str:
    return f"{ADAPTERS_PREFIX}/{validate_adapter_name(name)}/LATEST"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def publish_adapter(store: ObjectStore, folder: Path, metadata: AdapterMetadata) -> str:
    """Upload an adapter folder as ``metadata.name@metadata.version`` and make it LATEST.

    Order matters: weights and config first, metadata (the commit record) next,
    the LATEST pointer last. Returns the version's prefix URI.
    """
    prefix = version_prefix(metadata.name, metadata.version)
    store.upload(folder / WEIGHTS_FILE, f"{prefix}/{WEIGHTS_FILE}")
    store.upload(folder / CONFIG_FILE, f"{prefix}/{CONFIG_FILE}")
    for extra in sorted(folder.iterdir()):
        if extra.is_file() and extra.name not in ADAPTER_FILES:
            store.upload(extra, f"{prefix}/{extra.name}")
    store.put(f"{prefix}/{METADATA_FILE}", metadata.model_dump_json(indent=2).encode())
    store.put(latest_key(metadata.name), metadata.version.encode())
    return store.uri(prefix)


def resolve_version(store: ObjectStore, ref: AdapterRef) -> str:
    """The version ``ref`` names: its own, or the one LATEST points to."""
    if ref.version:
        if not store.exists(f"{version_prefix(ref.name, ref.version)}/{METADATA_FILE}"):
            raise AdapterNotFound(f"adapter {ref} does not exist")
        return ref.version
    try:
        version = store.get(latest_key(ref.name)).decode().strip()
    except ObjectNotFound as exc:
        raise AdapterNotFound(f"adapter {ref.name!r} does not exist") from exc
    return validate_version(version)


def read_metadata(store: ObjectStore, name: str, version: str) -> AdapterMetadata:
    try:
        raw = store.get(f"{version_prefix(name, version)}/{METADATA_FILE}")
    except ObjectNotFound as exc:
        raise AdapterNotFound(f"adapter {name}@{version} does not exist") from exc
    return AdapterMetadata.model_validate_json(raw)


def list_adapter_names(store: ObjectStore) -> list[str]:
    """Names of every adapter that has a LATEST pointer, sorted."""
    suffix = "/LATEST"
    return sorted(
        key[len(ADAPTERS_PREFIX) + 1 : -len(suffix)] for key in store.list(ADAPTERS_PREFIX) if key.endswith(suffix)
    )


def delete_adapter(store: ObjectStore, name: str) -> bool:
    """Remove every version of an adapter; LATEST goes first so readers stop at once."""
    # Only this name's own keys: a nested name ("a/b") shares the prefix "adapters/a/".
    versions = store.list(f"{ADAPTERS_PREFIX}/{validate_adapter_name(name)}/versions/")
    latest = latest_key(name)
    if not versions and not store.exists(latest):
        return False
    store.delete(latest)
    for key in versions:
        store.delete(key)
    return True


def check_adapter_config(
    config: dict[str, Any], *, max_rank: int, base_model: str | None = None, metadata: AdapterMetadata | None = None
) -> list[str]:
    """Every reason the engine could not or must not serve this adapter; [] if none.

    Shared by the trainer (at submit time) and inference (before load), so an
    adapter the trainer accepts is one inference serves.
    """
    problems: list[str] = []
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        problems.append(f"adapter_config.json: 'r' must be a positive integer, got {rank!r}")
    elif rank > max_rank:
        problems.append(f"LoRA rank {rank} exceeds this server's max_lora_rank {max_rank}")
    if config.get("use_dora"):
        problems.append("DoRA adapters (use_dora: true) are not supported")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save is not supported (got {config['modules_to_save']!r})")
    if config.get("bias", "none") != "none":
        problems.append(f"bias must be 'none', got {config.get('bias')!r}")
    targets = config.get("target_modules")
    names: Iterable[str]
    if isinstance(targets, str):
        names = [] if targets == "all-linear" else [targets]
    elif isinstance(targets, list):
        names = [str(t) for t in targets]
    else:
        names = []
        problems.append("adapter_config.json: 'target_modules' is missing")
    unsupported = sorted({n.rsplit(".", 1)[-1] for n in names} - SUPPORTED_TARGET_MODULES)
    if unsupported:
        problems.append(f"unsupported target modules {unsupported}; supported: {sorted(SUPPORTED_TARGET_MODULES)}")
    if base_model is not None and metadata is not None and metadata.base_model != base_model:
        problems.append(f"adapter was trained on {metadata.base_model!r}, this server serves {base_model!r}")
    return problems


def check_weight_names(tensor_names: Iterable[str]) -> list[str]:
    """Reasons tensor names cannot be served (embedding/lm_head LoRA, full weights)."""
    problems = []
    for name in tensor_names:
        if "lora_A" not in name and "lora_B" not in name:
            problems.append(f"tensor {name!r} is not a LoRA A/B weight")
        elif "embed_tokens" in name or "lm_head" in name:
            problems.append(f"tensor {name!r} applies LoRA to embeddings or lm_head, which is not supported")
    return problems[:10]


def load_config_file(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} must hold a JSON object")
    return data
