"""Checks an adapter folder must pass before the engine ever reads it.

Nothing here unpickles or imports weights: pickle-format files are refused by
name, and safetensors files are inspected through their JSON header only.
Every problem is collected so the caller sees all of them at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from safetensors import safe_open

from lorafleet_common.adapters import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterMetadata,
    check_adapter_config,
    check_weight_names,
    sha256_file,
)

# Formats that are (or may be) Python pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})


def pickle_files(names: Iterable[str]) -> list[str]:
    """The file names among ``names`` that are pickle formats (never downloaded, never opened)."""
    return sorted(n for n in names if Path(n).suffix.lower() in PICKLE_SUFFIXES)


def check_file_names(names: Iterable[str]) -> list[str]:
    """Problems visible from the list of files alone (a store listing or a folder)."""
    names = list(names)
    problems = [
        f"{name}: pickle-format weights are refused; publish adapter_model.safetensors only"
        for name in pickle_files(names)
    ]
    if WEIGHTS_FILE not in names:
        problems.append(f"{WEIGHTS_FILE} is missing")
    if CONFIG_FILE not in names:
        problems.append(f"{CONFIG_FILE} is missing")
    return problems


def validate_adapter_dir(
    folder: Path, *, metadata: AdapterMetadata, max_rank: int, base_model: str, check_names: bool = True
) -> list[str]:
    """Every reason the adapter in ``folder`` must not be loaded; [] when it may be."""
    problems = check_file_names(p.name for p in folder.iterdir()) if check_names else []
    config_rank: object = None
    config_path = folder / CONFIG_FILE
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            problems.append(f"{CONFIG_FILE} is not valid JSON: {exc}")
        else:
            if isinstance(config, dict):
                config_rank = config.get("r")
                problems += check_adapter_config(config, max_rank=max_rank, base_model=base_model, metadata=metadata)
            else:
                problems.append(f"{CONFIG_FILE} must hold a JSON object")
    weights = folder / WEIGHTS_FILE
    if weights.is_file():
        actual = sha256_file(weights)
        if actual != metadata.sha256:
            problems.append(f"{WEIGHTS_FILE} sha256 {actual} does not match metadata.sha256 {metadata.sha256}")
        header_problems, tensor_rank = _check_safetensors(weights)
        problems += header_problems
        # lora_A is [rank, in_features]: the config's 'r' could understate it, the shapes cannot.
        if tensor_rank > max_rank and isinstance(config_rank, int) and config_rank <= max_rank:
            problems.append(
                f"{WEIGHTS_FILE} holds rank-{tensor_rank} LoRA tensors (above max_lora_rank {max_rank}) "
                f"although {CONFIG_FILE} says r={config_rank}"
            )
    return problems


def _check_safetensors(path: Path) -> tuple[list[str], int]:
    """Problems with the tensor names, and the largest LoRA rank, from the header alone (no tensor data)."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types for a malformed header
        return [f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}"], 0
    if not shapes:
        return [f"{WEIGHTS_FILE} holds no tensors"], 0
    ranks = [shape[0] for name, shape in shapes.items() if "lora_A" in name and len(shape) == 2]
    return check_weight_names(shapes), max(ranks, default=0)
