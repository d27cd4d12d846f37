"""The base model's entry moved last in vLLM's LoRA tables (lorafleet_inference.lora_order), installed on vLLM's
real LoRAKernelMeta. What it fixes, vLLM's kernels replayed with a CUDA graph's adapter axis, is checked with the
kernels themselves in test_lora_grid.py (Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch
from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta

from lorafleet_inference import lora_order


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """lora_order installed for one test: vLLM's class as it was afterwards."""
    monkeypatch.setattr(LoRAKernelMeta, "prepare_tensors", LoRAKernelMeta.prepare_tensors)
    monkeypatch.setattr(LoRAKernelMeta, lora_order.PATCHED_FLAG, False, raising=False)
    assert lora_order.install() is True


def prepared(mapping: list[int], max_loras: int = 4) -> LoRAKernelMeta:
    meta = LoRAKernelMeta.make(max_loras, len(mapping), "cpu", [1, 2, 4, max_loras + 1])
    meta.prepare_tensors(torch.tensor(mapping, dtype=torch.int32))
    return meta


def tables(meta: LoRAKernelMeta) -> list[list[int]]:
    return [getattr(meta, name).tolist() for name in lora_order.TABLES]


@pytest.mark.usefixtures("installed")
def test_the_base_models_entry_goes_last_and_each_adapter_keeps_its_tokens() -> None:
    meta = prepared([2, -1, 0, -1, 2, 2, -1])
    ids, counts, starts = tables(meta)
    assert ids == [0, 2, -1, -1, -1] and counts == [1, 3, 0, 0, 3]
    assert starts[:2] == [3, 4] and starts[4] == 0  # vLLM sorted the base model's three tokens first
    order = meta.token_indices_sorted_by_lora_ids.tolist()
    for lora, count, start in zip(ids[:2], counts, starts, strict=False):
        assert {meta.token_lora_mapping[t].item() for t in order[start : start + count]} == {lora}
    assert int(meta.num_active_loras_cpu[0]) == 4  # what vLLM computed is left alone: 3 entries, rounded up


@pytest.mark.usefixtures("installed")
def test_steps_without_base_model_tokens_and_without_adapters_are_left_as_vllm_made_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    adapters_only, no_adapter = prepared([1, 0, 1, 3]), prepared([-1, -1])
    monkeypatch.setattr(LoRAKernelMeta, "prepare_tensors", LoRAKernelMeta.prepare_tensors.__wrapped__)  # vLLM's
    assert tables(adapters_only) == tables(prepared([1, 0, 1, 3]))
    assert tables(no_adapter) == tables(prepared([-1, -1])) and bool(no_adapter.no_lora_flag_cpu[0])


def test_install_wraps_once(installed: None) -> None:
    wrapped = LoRAKernelMeta.prepare_tensors
    assert lora_order.install() is True and LoRAKernelMeta.prepare_tensors is wrapped
