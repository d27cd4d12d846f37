"""Builders for hand-made adapter folders and published adapters, and a fake engine for unit tests."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from collections.abc import AsyncGenerator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from lorafleet_common.adapters import AdapterMetadata, publish_adapter, sha256_file
from lorafleet_common.settings import EMBEDDED_BASE_MODEL
from lorafleet_common.store import LocalStore
from lorafleet_inference.settings import InferenceSettings

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench_module(path: str) -> ModuleType:
    """A script under bench/ (``path`` relative to it) as a module, with bench/ on sys.path as when it runs there
    (its imports are its siblings); registered in sys.modules, where dataclasses look their module up."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    name = "bench_" + path.removesuffix(".py").replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, BENCH / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def cpu_replica_settings(home: Path, **overrides: Any) -> InferenceSettings:
    """A replica of the embedded model on the CPU, small enough for two engines at once in a test run."""
    values: dict[str, Any] = {
        "home": home,
        "store_url": (home / "store").as_uri(),
        "base_model": EMBEDDED_BASE_MODEL,
        "grpc_port": 0,
        "metrics_port": 0,
        "max_loras": 2,
        "max_lora_rank": 8,
        "max_cpu_loras": 3,
        "max_model_len": 512,
        "gpu_memory_utilization": 0.2,
        "enforce_eager": True,
    }
    return InferenceSettings(**(values | overrides))


PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter_dir(
    folder: Path,
    *,
    rank: int = 8,
    tensor_rank: int | None = None,
    hidden: int = 16,
    config: dict[str, Any] | None = None,
    extra_tensors: dict[str, tuple[int, ...]] | None = None,
) -> Path:
    """A PEFT-layout LoRA adapter (1 layer, all 7 projections) with random weights."""
    folder.mkdir(parents=True, exist_ok=True)
    r = tensor_rank or rank
    rng = np.random.default_rng(0)
    tensors: dict[str, np.ndarray] = {}
    for proj in PROJECTIONS:
        module = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        prefix = f"base_model.model.model.layers.0.{module}.{proj}"
        tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, hidden), dtype=np.float32)
        tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((hidden, r), dtype=np.float32)
    for name, shape in (extra_tensors or {}).items():
        tensors[name] = rng.standard_normal(shape, dtype=np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 16,
        "target_modules": PROJECTIONS,
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "base_model_name_or_path": EMBEDDED_BASE_MODEL,
    }
    cfg.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def metadata_for(folder: Path, name: str, version: str, **overrides: Any) -> AdapterMetadata:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    fields: dict[str, Any] = {
        "name": name,
        "version": version,
        "base_model": EMBEDDED_BASE_MODEL,
        "rank": cfg.get("r", 8),
        "alpha": cfg.get("lora_alpha", 16),
        "target_modules": PROJECTIONS,
        "sha256": sha256_file(folder / "adapter_model.safetensors"),
    }
    fields.update(overrides)
    return AdapterMetadata(**fields)


def publish(store: LocalStore | Any, folder: Path, name: str, version: str, **overrides: Any) -> AdapterMetadata:
    metadata = metadata_for(folder, name, version, **overrides)
    publish_adapter(store, folder, metadata)
    return metadata


class EvilPickle:
    """Unpickling this writes ``marker``: proof that something loaded the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "unpickled!"))


class FakeEngine:
    """Counts adapter calls; generate is not used by the adapter unit tests."""

    def __init__(self, add_delay_s: float = 0.0, fail_add: bool = False) -> None:
        self.added: list[Any] = []
        self.removed: list[int] = []
        self.add_delay_s = add_delay_s
        self.fail_add = fail_add

    def generate(
        self, prompt: Any, sampling_params: Any, request_id: str, *, lora_request: Any = None
    ) -> AsyncGenerator[Any, None]:
        raise NotImplementedError

    async def abort(self, request_id: str) -> None:
        return None

    async def add_lora(self, lora_request: Any) -> bool:
        await asyncio.sleep(self.add_delay_s)
        if self.fail_add:
            raise RuntimeError("tensor shapes do not match the model")
        self.added.append(lora_request)
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        self.removed.append(lora_id)
        return True

    async def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        return None
