"""merge_worker on a small torch model shaped like vLLM's: packed qkv/gate_up layers, row-parallel layers, a LoRA
wrapper, and weight loaders that shard the way vLLM's do (tensor parallelism of 2, each rank checked).

The layers are stand-ins for vLLM's (which need an initialised tensor-parallel group); the real layers and their
loaders are exercised by test_merge_engine.py on the CPU engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lorafleet_inference import merge, merge_worker
from lorafleet_inference.merge_worker import (
    MergeRefused,
    MergeWorkerExtension,
    WeightMerger,
    lora_scaling,
    read_adapter,
)

HIDDEN, HEADS, KV_HEADS, HEAD, INTER = 16, 4, 2, 4, 24
PEFT = "base_model.model.model.layers.0"
MODULES = {  # PEFT module -> (out, in)
    "self_attn.q_proj": (HEADS * HEAD, HIDDEN),
    "self_attn.k_proj": (KV_HEADS * HEAD, HIDDEN),
    "self_attn.v_proj": (KV_HEADS * HEAD, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HEADS * HEAD),
    "mlp.gate_proj": (INTER, HIDDEN),
    "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}


class UnquantizedLinearMethod:
    """Named like vLLM's: merge_worker merges only layers with this quant method."""


class Int8LinearMethod:
    pass


class ColumnParallelLinear(nn.Module):
    """Output rows sharded over ranks; packed sub-modules side by side (vLLM's MergedColumnParallelLinear)."""

    def __init__(self, input_size: int, output_sizes: list[int], rank: int, tp: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_size, self.output_sizes, self.output_size = input_size, output_sizes, sum(output_sizes)
        self.tp_rank, self.tp_size = rank, tp
        self.quant_method: Any = UnquantizedLinearMethod()
        self.weight = nn.Parameter(torch.zeros(self.output_size // tp, input_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def _index(self, shard_id: str | int) -> int:
        assert isinstance(shard_id, int)
        return shard_id

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        if shard_id is None:
            size = param.data.shape[0]
            param.data.copy_(loaded.narrow(0, self.tp_rank * size, size))
            return
        index = self._index(shard_id)
        offset = sum(self.output_sizes[:index]) // self.tp_size
        size = self.output_sizes[index] // self.tp_size
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Named like vLLM's: its loader takes shard ids "q", "k", "v"."""

    def __init__(self, rank: int, tp: int, dtype: torch.dtype) -> None:
        super().__init__(HIDDEN, [HEADS * HEAD, KV_HEADS * HEAD, KV_HEADS * HEAD], rank, tp, dtype)
        self.total_num_heads, self.total_num_kv_heads, self.head_size = HEADS, KV_HEADS, HEAD

    def _index(self, shard_id: str | int) -> int:
        assert isinstance(shard_id, str)
        return "qkv".index(shard_id)


class RowParallelLinear(nn.Module):
    """Input columns sharded over ranks (vLLM's RowParallelLinear)."""

    def __init__(self, input_size: int, output_size: int, rank: int, tp: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_size, self.output_size, self.tp_rank = input_size, output_size, rank
        self.quant_method: Any = UnquantizedLinearMethod()
        self.weight = nn.Parameter(torch.zeros(output_size, input_size // tp, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        size = param.data.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp_rank * size, size))


class LoRAWrapper(nn.Module):
    """What enable_lora puts around a target layer."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer


class TinyModel(nn.Module):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, rank: int = 0, tp: int = 1, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        layer = nn.Module()
        layer.self_attn = nn.Module()
        layer.self_attn.qkv_proj = LoRAWrapper(QKVParallelLinear(rank, tp, dtype))
        layer.self_attn.o_proj = RowParallelLinear(HEADS * HEAD, HIDDEN, rank, tp, dtype)
        layer.mlp = nn.Module()
        layer.mlp.gate_up_proj = LoRAWrapper(ColumnParallelLinear(HIDDEN, [INTER, INTER], rank, tp, dtype))
        layer.mlp.down_proj = RowParallelLinear(INTER, HIDDEN, rank, tp, dtype)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([layer])

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_parameters()}


def full_base_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {m: torch.randn(shape, generator=generator).to(torch.bfloat16) for m, shape in MODULES.items()}


def load_base(model: TinyModel, base: dict[str, torch.Tensor]) -> None:
    """The checkpoint into each rank's shards, through the layers' own loaders (as vLLM loads a model)."""
    layer: Any = model.model.layers[0]
    qkv, gate_up = layer.self_attn.qkv_proj.base_layer, layer.mlp.gate_up_proj.base_layer
    for shard, module in zip("qkv", ("q_proj", "k_proj", "v_proj"), strict=True):
        qkv.weight_loader(qkv.weight, base[f"self_attn.{module}"], shard)
    for index, module in enumerate(("gate_proj", "up_proj")):
        gate_up.weight_loader(gate_up.weight, base[f"mlp.{module}"], index)
    layer.self_attn.o_proj.weight_loader(layer.self_attn.o_proj.weight, base["self_attn.o_proj"])
    layer.mlp.down_proj.weight_loader(layer.mlp.down_proj.weight, base["mlp.down_proj"])


def write_adapter(
    folder: Path, *, seed: int, rank: int = 4, modules: dict[str, tuple[int, int]] = MODULES, **config: Any
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_features, in_features) in modules.items():
        tensors[f"{PEFT}.{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator)
        tensors[f"{PEFT}.{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 8, **config}))
    return folder


def expected_shards(base: dict[str, torch.Tensor], folder: Path, rank: int, tp: int) -> dict[str, torch.Tensor]:
    """Each rank's merged weights computed independently: full W + scaling * B @ A, then sliced by hand."""
    pairs = {p.module.removeprefix("model.layers.0."): p for p in read_adapter(folder)}

    def merged(module: str) -> torch.Tensor:
        pair = pairs[module]
        return (pair.b.float() @ pair.a.float()) * pair.scaling + base[module].float()

    def rows(module: str) -> torch.Tensor:
        full = merged(module)
        size = full.shape[0] // tp
        return full[rank * size : (rank + 1) * size]

    def cols(module: str) -> torch.Tensor:
        full = merged(module)
        size = full.shape[1] // tp
        return full[:, rank * size : (rank + 1) * size]

    prefix = "model.layers.0."
    shards = {
        f"{prefix}self_attn.qkv_proj.base_layer.weight": torch.cat([rows(f"self_attn.{m}_proj") for m in "qkv"]),
        f"{prefix}self_attn.o_proj.weight": cols("self_attn.o_proj"),
        f"{prefix}mlp.gate_up_proj.base_layer.weight": torch.cat([rows("mlp.gate_proj"), rows("mlp.up_proj")]),
        f"{prefix}mlp.down_proj.weight": cols("mlp.down_proj"),
    }
    return {name: value.to(torch.bfloat16) for name, value in shards.items()}


@pytest.mark.parametrize("rank", [0, 1])
def test_merge_places_each_ranks_shard_in_place_and_restore_is_bit_exact(rank: int, tmp_path: Path) -> None:
    base = full_base_weights()
    model = TinyModel(rank=rank, tp=2)
    load_base(model, base)
    before = model.weights()
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    adapter = write_adapter(tmp_path / "a", seed=1)
    merger = WeightMerger(model)

    result = merger.merge(adapter, "a@v1")

    assert (result["merged"], result["layers"], merger.merged) == ("a@v1", 4, "a@v1")
    after = model.weights()
    for name, want in expected_shards(base, adapter, rank, tp=2).items():
        assert torch.equal(after[name], want), name
    assert all(not torch.equal(after[n], before[n]) for n in before)
    # In place: CUDA graphs captured at start-up keep pointing at these tensors.
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers
    assert merger.host_copy_bytes == sum(t.numel() * t.element_size() for t in before.values())

    assert merger.restore() == 4
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert merger.merged == "" and merger.restore() == 0


def test_merging_another_adapter_starts_from_the_base(tmp_path: Path) -> None:
    base = full_base_weights()
    model = TinyModel()
    load_base(model, base)
    merger = WeightMerger(model)
    merger.merge(write_adapter(tmp_path / "a", seed=1), "a@v1")
    second = write_adapter(tmp_path / "b", seed=2, use_rslora=True)
    merger.merge(second, "b@v1")
    after = model.weights()
    for name, want in expected_shards(base, second, 0, tp=1).items():
        assert torch.equal(after[name], want), name


def test_an_adapter_on_some_modules_changes_only_those(tmp_path: Path) -> None:
    """Also after an adapter on every module: the layers the new one leaves alone go back to the base."""
    model = TinyModel()
    load_base(model, full_base_weights())
    before = model.weights()
    merger = WeightMerger(model)
    merger.merge(write_adapter(tmp_path / "all", seed=1), "all@1")
    only_v = {"self_attn.v_proj": MODULES["self_attn.v_proj"]}
    assert merger.merge(write_adapter(tmp_path / "v", seed=3, modules=only_v), "v@1")["layers"] == 1
    after = model.weights()
    qkv = "model.layers.0.self_attn.qkv_proj.base_layer.weight"
    q_and_k = (HEADS + KV_HEADS) * HEAD
    assert torch.equal(after[qkv][:q_and_k], before[qkv][:q_and_k])
    assert not torch.equal(after[qkv][q_and_k:], before[qkv][q_and_k:])
    assert all(torch.equal(after[n], before[n]) for n in before if n != qkv)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"modules": {"self_attn.q_proj": (HEADS * HEAD, HIDDEN + 1)}}, "B @ A is 16x17, the model's weight is 16x16"),
        ({"modules": {"mlp.experts_proj": (8, HIDDEN)}}, "the model has no module model.layers.0.mlp.experts_proj"),
        ({"quantized": True}, "quantized weights cannot be merged"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ],
)
def test_refusals_change_nothing(change: dict[str, Any], message: str, tmp_path: Path) -> None:
    model = TinyModel()
    load_base(model, full_base_weights())
    merger = WeightMerger(model)
    merger.merge(write_adapter(tmp_path / "ok", seed=1), "ok@1")
    merged = model.weights()
    if change.pop("quantized", False):
        model.model.layers[0].mlp.down_proj.quant_method = Int8LinearMethod()
    with pytest.raises(MergeRefused, match=message):
        merger.merge(write_adapter(tmp_path / "bad", seed=2, **change), "bad@1")
    assert merger.merged == "ok@1"
    assert all(torch.equal(p, merged[n]) for n, p in model.named_parameters())


def test_a_failure_while_writing_restores_the_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = TinyModel()
    load_base(model, full_base_weights())
    before = model.weights()
    calls = []
    original = merge_worker.write_weight

    def failing(layer: Any, value: torch.Tensor) -> None:
        calls.append(layer)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        original(layer, value)

    monkeypatch.setattr(merge_worker, "write_weight", failing)
    merger = WeightMerger(model)
    with pytest.raises(RuntimeError, match="device lost"):
        merger.merge(write_adapter(tmp_path / "a", seed=1), "a@1")
    assert merger.merged == ""
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_scaling_follows_peft() -> None:
    assert lora_scaling({"r": 8, "lora_alpha": 16}, "model.layers.0.mlp.up_proj") == 2.0
    assert lora_scaling({"r": 16, "lora_alpha": 16, "use_rslora": True}, "x.q_proj") == 4.0
    config = {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"layers.1.mlp.up_proj": 2}}
    assert lora_scaling(config, "model.layers.0.self_attn.q_proj") == 4.0
    assert lora_scaling(config, "model.layers.1.mlp.up_proj") == 0.25
    assert lora_scaling(config, "model.layers.11.mlp.up_proj") == 2.0  # a pattern matches at a "." boundary


def test_the_worker_extension_and_the_service_agree_on_method_names() -> None:
    from lorafleet_inference.engine import MERGE_WORKER_EXTENSION

    module, _, name = MERGE_WORKER_EXTENSION.rpartition(".")
    assert (module, name) == (merge_worker.__name__, MergeWorkerExtension.__name__)
    assert callable(getattr(MergeWorkerExtension, merge.MERGE_RPC))
    assert callable(getattr(MergeWorkerExtension, merge.RESTORE_RPC))
    assert (merge.MERGE_RPC, merge.RESTORE_RPC) == (merge_worker.MERGE_RPC, merge_worker.RESTORE_RPC)


def test_worker_methods_report_refusals_instead_of_raising(tmp_path: Path) -> None:
    class FakeRunner:
        def __init__(self, model: nn.Module) -> None:
            self.model = model

        def get_model(self) -> nn.Module:
            return self.model

    class Worker(MergeWorkerExtension):
        def __init__(self, model: nn.Module) -> None:
            self.model_runner = FakeRunner(model)

    worker = Worker(TinyModel())
    bad = write_adapter(tmp_path / "bad", seed=1, modules={"mlp.nope": (4, 4)})
    refused = worker.lorafleet_merge_adapter(str(bad), "bad@1")
    assert refused["merged"] == "" and "no module" in refused["refused"]
    done = worker.lorafleet_merge_adapter(str(write_adapter(tmp_path / "ok", seed=1)), "ok@1")
    assert (done["merged"], done["refused"], done["layers"]) == ("ok@1", "", 4)
    assert worker.lorafleet_restore_base()["layers"] == 4
