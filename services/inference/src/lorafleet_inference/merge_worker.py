"""Merged mode inside vLLM's workers: add one LoRA adapter into the base model's linear weights, and put the
base weights back exactly.

vLLM mixes ``MergeWorkerExtension`` into its Worker class when the engine arguments name it
(``worker_extension_cls``, set only when merge mode is on); the service calls its methods by name through
``AsyncLLM.collective_rpc``, so every tensor-parallel rank runs them on its own shard. The engine runs them
between steps; the service drains the requests in flight first.

How a weight changes:

* PEFT's ``base_model.model.<module>.lora_A.weight`` ([r, in]) and ``lora_B.weight`` ([out, r]) give
  delta = scaling * B @ A, in float32; scaling = lora_alpha / r (lora_alpha / sqrt(r) with ``use_rslora``),
  with PEFT's ``rank_pattern`` / ``alpha_pattern`` per module.
* The model's ``packed_modules_mapping`` names the vLLM module that holds each PEFT module (q/k/v_proj live in
  qkv_proj as shards "q"/"k"/"v", gate/up_proj in gate_up_proj as shards 0/1), and that layer's own weight
  loader, the code that loaded the checkpoint, puts the delta into this rank's shard of a zeroed scratch
  tensor: tensor parallelism (and replicated KV heads) need no sharding logic here.
* Weights change in place (``param.data``): CUDA graphs captured at start-up point at these tensors.
* The first time a weight changes, a host (CPU) copy of it is kept for the life of the process. Every merge
  starts from that copy (merging B after A gives base + delta(B)), and restoring copies it back: bit-exact.

vLLM's CPU backend is the exception: at load time it packs every linear weight into oneDNN's layout and
drops the plain tensor (``dispatch_cpu_unquantized_gemm(remove_weight=True)``), so there is nothing to change
in place. There the base weight is read back by passing the identity matrix through the layer (each output is
one product with 1.0: exact), and a changed weight is packed again with vLLM's own dispatch. The CPU backend
has no CUDA graphs; run it eager (the service's CPU default).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

MERGE_RPC = "lorafleet_merge_adapter"
RESTORE_RPC = "lorafleet_restore_base"
MERGEABLE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
QKV_SHARD_IDS = ("q", "k", "v")
PEFT_PREFIX = "base_model.model."
IDENTITY_ROWS = 1024  # rows of the identity per pass when reading a packed CPU weight back (bounds the scratch)


class MergeRefused(Exception):
    """The adapter cannot be merged into this model; nothing was changed."""


@dataclass(frozen=True)
class LoraPair:
    """The A and B matrices of one PEFT module (named as in the base model, e.g. ``model.layers.0.mlp.up_proj``)."""

    module: str
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float

    def delta(self, device: torch.device) -> torch.Tensor:
        """scaling * B @ A in float32 on ``device``: the full (unsharded) change of the module's weight."""
        return (self.b.to(device, torch.float32) @ self.a.to(device, torch.float32)) * self.scaling


def lora_scaling(config: dict[str, Any], module: str) -> float:
    """PEFT's scaling of ``module``: alpha / r, or alpha / sqrt(r) with rsLoRA; per-module patterns first."""
    rank = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r"))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, int | float):
        raise MergeRefused(f"adapter_config.json has no usable r / lora_alpha for {module} (r={rank!r})")
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT's get_pattern_key: a key matches a suffix of the module name that starts at a "."; first match wins.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(folder: Path) -> list[LoraPair]:
    """The LoRA pairs of the PEFT adapter in ``folder`` (adapter_model.safetensors + adapter_config.json)."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("fan_in_fan_out"):
        raise MergeRefused("fan_in_fan_out adapters (transposed weights, GPT-2 style Conv1D) cannot be merged")
    tensors = load_file(str(folder / "adapter_model.safetensors"), device="cpu")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, tensor in tensors.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)\.weight", key)
        if match is None or tensor.ndim != 2:
            problems.append(f"tensor {key!r} is not a 2-D LoRA A/B weight of a linear module")
            continue
        halves.setdefault(match.group(1), {})[match.group(2)] = tensor
    pairs = []
    for module, half in sorted(halves.items()):
        if set(half) != {"lora_A", "lora_B"}:
            problems.append(f"{module} has {sorted(half)} but needs both lora_A and lora_B")
        elif half["lora_A"].shape[0] != half["lora_B"].shape[1]:
            problems.append(f"{module}: lora_A {list(half['lora_A'].shape)} and lora_B {list(half['lora_B'].shape)}")
        else:
            pairs.append(LoraPair(module, half["lora_A"], half["lora_B"], lora_scaling(config, module)))
    if problems:
        raise MergeRefused("; ".join(problems[:5]))
    if not pairs:
        raise MergeRefused("the adapter holds no LoRA weights")
    return pairs


# ----- where each delta goes ----------------------------------------------------------------------------------


@dataclass
class Placement:
    """One vLLM linear layer and the LoRA pairs that change it, each with the shard id its weight loader takes."""

    name: str
    layer: Any  # a vLLM LinearBase: its attributes (output_sizes, quant_method, ...) vary by class
    parts: list[tuple[LoraPair, str | int | None]] = field(default_factory=list)


def _is_qkv(layer: Any) -> bool:
    # vLLM's QKV loader takes shard ids "q"/"k"/"v"; every other packed layer takes the sub-module's index.
    return any(cls.__name__ == "QKVParallelLinear" for cls in type(layer).__mro__)


def _full_shape(layer: Any, index: int | None) -> tuple[int, int]:
    """(out, in) of the PEFT module before tensor-parallel sharding: what B @ A must be."""
    if index is None:
        return int(layer.output_size), int(layer.input_size)
    if _is_qkv(layer):
        heads = [layer.total_num_heads, layer.total_num_kv_heads, layer.total_num_kv_heads][index]
        head_size = layer.head_size if index < 2 else getattr(layer, "v_head_size", layer.head_size)
        return int(heads * head_size), int(layer.input_size)
    return int(layer.output_sizes[index]), int(layer.input_size)


def _linear_layer(model: nn.Module, name: str) -> tuple[Any, str]:
    """The plain linear layer at ``name`` (inside vLLM's LoRA wrapper if there is one), or why it cannot merge."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None, f"the model has no module {name}"
    layer = getattr(module, "base_layer", module)  # enable_lora wraps every target layer
    method = type(getattr(layer, "quant_method", None)).__name__
    weight = getattr(layer, "weight", None)
    if method != "UnquantizedLinearMethod" or not isinstance(weight, torch.Tensor):
        return None, f"{name} is not a plain linear layer ({method}): quantized weights cannot be merged"
    if weight.dtype not in MERGEABLE_DTYPES:
        return None, f"{name} holds {weight.dtype} weights; only bfloat16, float16 and float32 can be merged"
    return layer, ""


def plan_merge(model: nn.Module, pairs: list[LoraPair]) -> list[Placement]:
    """Every pair assigned to its vLLM layer and shard, every shape checked; MergeRefused before any change."""
    packed: dict[str, list[str]] = dict(getattr(model, "packed_modules_mapping", None) or {})
    owner = {sub: (packed_name, i) for packed_name, subs in packed.items() for i, sub in enumerate(subs)}
    placements: dict[str, Placement] = {}
    problems = []
    for pair in pairs:
        parent, _, leaf = pair.module.rpartition(".")
        packed_name, index = owner.get(leaf, (leaf, None))
        name = f"{parent}.{packed_name}" if parent else packed_name
        layer, problem = _linear_layer(model, name)
        if layer is None:
            problems.append(f"{pair.module}: {problem}")
            continue
        out_features, in_features = _full_shape(layer, index)
        if (pair.b.shape[0], pair.a.shape[1]) != (out_features, in_features):
            problems.append(
                f"{pair.module}: B @ A is {pair.b.shape[0]}x{pair.a.shape[1]}, the model's weight is "
                f"{out_features}x{in_features}"
            )
            continue
        shard_id = None if index is None else (QKV_SHARD_IDS[index] if _is_qkv(layer) else index)
        placements.setdefault(name, Placement(name, layer)).parts.append((pair, shard_id))
    if problems:
        raise MergeRefused("; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    return list(placements.values())


# ----- reading and writing one layer's weight ---------------------------------------------------------------


def is_packed_cpu(layer: Any) -> bool:
    return layer.weight.numel() == 0 and callable(getattr(layer, "cpu_linear", None))


def _loader_param(layer: Any) -> Any:
    """A parameter whose own weight loader places a delta: the layer's weight, or on the CPU backend (where the
    weight is gone) an identical new one, made by the layer's quant method as at load time."""
    if not is_packed_cpu(layer):
        return layer.weight
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED

    method = layer.quant_method
    v2 = type(method).__name__ in WEIGHT_LOADER_V2_SUPPORTED
    holder = nn.Module()
    method.create_weights(
        holder,
        layer.input_size_per_partition,
        list(layer.output_partition_sizes),
        layer.input_size,
        layer.output_size,
        torch.float32,
        weight_loader=layer.weight_loader_v2 if v2 else layer.weight_loader,
    )
    param: Any = holder.weight
    for attr in ("tp_rank", "tp_size"):  # as LinearBase.update_param_tp_status does after create_weights
        if hasattr(param, attr) and hasattr(layer, attr):
            setattr(param, attr, getattr(layer, attr))
    return param


def place_delta(param: Any, into: torch.Tensor, delta: torch.Tensor, shard_id: str | int | None) -> None:
    """Write this rank's share of ``delta`` into ``into`` (laid out like ``param``) with ``param``'s own weight
    loader, which writes into ``param.data``: that is pointed at ``into`` for the call. The shards of one layer
    are disjoint, so its parts can all go into one zeroed tensor."""
    original = param.data
    param.data = into
    try:
        if shard_id is None:
            param.weight_loader(param, delta)
        else:
            param.weight_loader(param, delta, shard_id)
    finally:
        param.data = original


def read_weight(layer: Any) -> torch.Tensor:
    """The layer's current weight as a host tensor (a copy; pageable: pinned host memory would be rounded up to
    powers of two by torch's allocator, up to twice the size)."""
    if not is_packed_cpu(layer):
        return layer.weight.data.detach().to("cpu", copy=True)
    size = int(layer.input_size_per_partition)
    dtype = layer.weight.dtype
    rows = []
    for start in range(0, size, IDENTITY_ROWS):
        count = min(IDENTITY_ROWS, size - start)
        eye = torch.zeros(count, size, dtype=dtype)
        eye[:, start : start + count] = torch.eye(count, dtype=dtype)
        rows.append(layer.cpu_linear(eye, None, None))  # rows of W^T
    return torch.cat(rows).t().contiguous()


def write_weight(layer: Any, value: torch.Tensor) -> None:
    """Make ``value`` (host or device, the weight's shape, any float dtype) the layer's weight."""
    if not is_packed_cpu(layer):
        layer.weight.data.copy_(value)
        return
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer.weight = nn.Parameter(value.to(layer.weight.dtype).contiguous(), requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=True)


def weight_device(layer: Any) -> torch.device:
    return layer.weight.device


# ----- the merger ---------------------------------------------------------------------------------------------


class WeightMerger:
    """Merges one adapter at a time into a model's linear weights and restores them from host copies."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.merged = ""  # the adapter ("name@version") in the weights now; "" = base weights
        self._base: dict[str, torch.Tensor] = {}  # layer name -> host copy of its base weight
        self._layers: dict[str, Any] = {}
        self._changed: set[str] = set()  # layers whose weight differs from their base copy now

    @property
    def host_copy_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._base.values())

    def merge(self, folder: Path, key: str) -> dict[str, Any]:
        """Weights = base + the adapter in ``folder``. MergeRefused (nothing changed) if it does not fit."""
        started = time.monotonic()
        placements = plan_merge(self.model, read_adapter(folder))
        try:
            for name in sorted(self._changed - {p.name for p in placements}):  # left alone by this adapter
                self._restore_layer(name)
            for placement in placements:
                self._merge_layer(placement)
        except BaseException:
            log.exception("merging %s failed; restoring the base weights", key)
            self.restore()
            raise
        self.merged = key
        return {"merged": key, "layers": len(placements), "seconds": time.monotonic() - started}

    def _merge_layer(self, placement: Placement) -> None:
        name, layer = placement.name, placement.layer
        if name not in self._base:
            self._base[name] = read_weight(layer)
            self._layers[name] = layer
        device = weight_device(layer)
        param = _loader_param(layer)
        total = torch.zeros(self._base[name].shape, dtype=torch.float32, device=device)
        for pair, shard_id in placement.parts:
            place_delta(param, total, pair.delta(device), shard_id)
        if name in self._changed or is_packed_cpu(layer):
            total.add_(self._base[name].to(device))
        else:
            total.add_(layer.weight.data)  # the weight on the device is the base: no copy from the host
        self._changed.add(name)  # before the write: a failed write is restored too
        write_weight(layer, total)

    def _restore_layer(self, name: str) -> None:
        write_weight(self._layers[name], self._base[name])
        self._changed.discard(name)

    def restore(self) -> int:
        """Put the base weight back into every changed layer (bit-exact); returns how many."""
        changed = sorted(self._changed)
        for name in changed:
            self._restore_layer(name)
        self.merged = ""
        return len(changed)


@contextmanager
def _timed(what: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    log.info("%s in %.2f s", what, time.monotonic() - started)


class MergeWorkerExtension:
    """Methods vLLM adds to its Worker (``worker_extension_cls``); the ``lorafleet_`` prefix keeps them clear of
    the worker's own names. Each returns a small dict (the collective RPC sends it back to the service)."""

    def _lorafleet_merger(self) -> WeightMerger:
        merger: WeightMerger | None = getattr(self, "_lorafleet_weight_merger", None)
        if merger is None:
            merger = WeightMerger(self.model_runner.get_model())  # type: ignore[attr-defined]
            self._lorafleet_weight_merger = merger
        return merger

    def lorafleet_merge_adapter(self, adapter_dir: str, key: str) -> dict[str, Any]:
        """Merge the adapter in ``adapter_dir`` (a validated disk-tier copy); ``refused`` says why not, if not."""
        merger = self._lorafleet_merger()
        try:
            with _timed(f"merged {key}"):
                result = merger.merge(Path(adapter_dir), key)
        except MergeRefused as exc:
            return {"merged": merger.merged, "refused": str(exc)}
        return {**result, "refused": "", "host_copy_bytes": merger.host_copy_bytes}

    def lorafleet_restore_base(self) -> dict[str, Any]:
        """Back to the base weights."""
        merger = self._lorafleet_merger()
        with _timed("restored the base weights"):
            restored = merger.restore()
        return {"merged": "", "layers": restored, "host_copy_bytes": merger.host_copy_bytes}
