"""Tuned LoRA kernel configs: the files bench/tune_lora_kernels.py writes and the replica ships are the ones vLLM's
own lookup (vllm/lora/ops/triton_ops/utils.py) reads, for every shape Qwen2.5-7B's projections ask for; the
replica hands vLLM the folder the settings name; the tuner keeps the default unless a candidate really wins."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lorafleet_inference.engine import PACKAGED_LORA_KERNEL_CONFIGS, TUNED_CONFIG_ENV, use_lora_kernel_configs
from lorafleet_inference.settings import InferenceSettings
from tests.inference.inference_helpers import load_bench_module

H100 = "NVIDIA H100 80GB HBM3"


lk = load_bench_module("serving/lora_kernels.py")


@pytest.fixture
def vllm_lookup(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """vLLM's get_lora_op_configs as the engine calls it, on a machine that reports itself an H100."""
    import torch
    from vllm.lora.ops.triton_ops import utils

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: H100)
    utils.load_lora_op_config.cache_clear()
    utils.get_lora_op_configs.cache_clear()
    yield utils.get_lora_op_configs
    utils.load_lora_op_config.cache_clear()
    utils.get_lora_op_configs.cache_clear()


def engine_asks(lookup: Any, shape: Any, m: int, max_loras: int) -> dict[str, Any]:
    return dict(lookup(**lk.vllm_lookup_args(shape, m, max_loras)))


def test_written_files_are_what_vllm_reads(tmp_path: Path, vllm_lookup: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    shapes = lk.kernel_shapes(lk.MODEL_SHAPES["qwen2.5-7b"], 16)
    chosen = []
    for i, shape in enumerate(shapes):
        for m in lk.token_counts(16384):
            chosen.append((shape, m, lk.space(shape)[(i * 7 + m) % len(lk.space(shape))]))
    files = lk.vllm_config_files(H100, 32, chosen)
    assert set(files) == {"NVIDIA_H100_80GB_HBM3_SHRINK.json", "NVIDIA_H100_80GB_HBM3_EXPAND_TRUE.json"}
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    monkeypatch.setenv(TUNED_CONFIG_ENV, str(tmp_path))
    for shape, m, config in chosen:
        assert engine_asks(vllm_lookup, shape, m, 32) == config, (shape.label, m)
    # a step size between two tuned ones gets the nearer one's config
    gate_up = next(s for s in shapes if s.label == "expand gate_up")
    by_m = {m: c for s, m, c in chosen if s is gate_up}
    assert engine_asks(vllm_lookup, gate_up, 300, 32) == by_m[256]
    assert engine_asks(vllm_lookup, gate_up, 20000, 32) == by_m[16384]


def test_packaged_configs_cover_every_call_of_the_engine(vllm_lookup: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the replica's slots, rank or step: a complete launch config (a missing num_slices key would raise
    inside the engine's forward pass)."""
    names = {p.name for p in PACKAGED_LORA_KERNEL_CONFIGS.glob("*.json")}
    assert names == set(lk.vllm_file_names(H100).values())
    monkeypatch.setenv(TUNED_CONFIG_ENV, str(PACKAGED_LORA_KERNEL_CONFIGS))
    shrink_keys = {"block_m", "block_n", "block_k", "split_k", "num_warps", "num_ctas", "num_stages"}
    expand_keys = {"block_m", "block_n", "block_k", "num_warps", "num_ctas", "num_stages"}
    for rank in (8, 16, 64):
        for shape in lk.kernel_shapes(lk.MODEL_SHAPES["qwen2.5-7b"], rank):
            for max_loras in (1, 4, 32, 128):
                for m in (1, 3, 16, 200, 2048, 16384):
                    config = engine_asks(vllm_lookup, shape, m, max_loras)
                    assert set(config) >= (shrink_keys if shape.op == "shrink" else expand_keys)
                    assert config["block_n" if shape.op == "shrink" else "block_k"] >= 16  # the rank fits one tile


def test_replica_hands_vllm_the_folder_the_settings_name(tmp_path: Path) -> None:
    environ: dict[str, str] = {}
    use_lora_kernel_configs(InferenceSettings(), environ)
    assert environ == {TUNED_CONFIG_ENV: str(PACKAGED_LORA_KERNEL_CONFIGS)}
    environ = {TUNED_CONFIG_ENV: "/operators/own"}  # an operator's variable wins over the packaged files
    use_lora_kernel_configs(InferenceSettings(), environ)
    assert environ == {TUNED_CONFIG_ENV: "/operators/own"}
    use_lora_kernel_configs(InferenceSettings(lora_kernel_configs=tmp_path), environ)
    assert environ == {TUNED_CONFIG_ENV: str(tmp_path)}
    use_lora_kernel_configs(InferenceSettings(lora_kernel_configs="vllm"), environ)
    assert environ == {}


def test_settings_read_the_choice_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAFLEET_INFERENCE_LORA_KERNEL_CONFIGS", "vllm")
    assert InferenceSettings().lora_kernel_configs == "vllm"
    monkeypatch.setenv("LORAFLEET_INFERENCE_LORA_KERNEL_CONFIGS", str(tmp_path))
    assert InferenceSettings().lora_kernel_configs == tmp_path


def test_choose_keeps_the_default_unless_a_candidate_wins_everywhere() -> None:
    default = {"block_m": 64}
    default_ms = {1: 10.0, 8: 20.0}
    fast, mixed, tiny = {"block_m": 16}, {"block_m": 32}, {"block_m": 128}
    candidates = [
        (mixed, {1: 5.0, 8: 22.0}),  # 10% slower with 8 adapters: never chosen
        (fast, {1: 8.0, 8: 16.0}),
        (tiny, {1: 9.9, 8: 19.9}),  # within noise
        ({"block_m": 256}, {1: 1.0}),  # failed with 8 adapters
    ]
    choice = lk.choose(default_ms, candidates, default)
    assert choice.config == fast and not choice.default
    assert choice.ratios == pytest.approx({1: 0.8, 8: 0.8})
    assert lk.choose(default_ms, candidates[2:], default).config == default


def test_search_space_leaves_out_only_wasted_splits() -> None:
    for k in (3584, 18944):
        configs = lk.shrink_space(k, 16)
        assert all(c["block_k"] * c["split_k"] <= 2 * k for c in configs)
        assert {c["split_k"] for c in configs} == {1, 2, 4, 8, 16, 32, 64}
    assert {c["block_k"] for c in lk.expand_space(8)} == {16}
    assert lk.token_counts(16384)[:3] == [1, 16, 32] and lk.token_counts(16384)[-1] == 16384
    assert lk.active_counts([1, 8, 32], 16, 32) == [1, 8, 16]


def test_large_steps_share_one_config_chosen_on_all_of_them() -> None:
    """Steps past the CUDA-graph sizes compile their config mid-serving: one config for all of them, the one best
    over all of them together (here b, though a wins at m=1024 alone); smaller steps each get their own."""
    a, b, c, default = {"block_m": 16}, {"block_m": 32}, {"block_m": 64}, {"block_m": 128}

    def at(default_ms: float, times: list[float]) -> dict[str, Any]:
        return {
            "ms": {1: default_ms},
            "measured": [(cfg, {1: t}) for cfg, t in zip((a, b, c), times, strict=True)],
            "default": default,
        }

    by_m = {
        16: at(10.0, [5.0, 9.0, 9.0]),
        256: at(10.0, [9.0, 9.0, 4.0]),
        1024: at(10.0, [6.0, 7.0, 9.0]),
        16384: at(10.0, [10.4, 6.0, 9.0]),
    }
    picked = lk.pick(by_m, 512)
    assert picked[16].config == a and picked[256].config == c
    assert picked[1024].config == picked[16384].config == b
    assert picked[1024].ratios == pytest.approx({1: 0.7}) and picked[16384].ratios == pytest.approx({1: 0.6})


def test_a_partial_tuning_replaces_only_its_own_entries() -> None:
    shipped = {"33": {"2": {"16": {"3584": {"37888": {"block_m": 16}}}, "512": {"3584": {"37888": {"block_m": 64}}}}}}
    retuned = {"33": {"2": {"16": {"3584": {"37888": {"block_m": 32}}}}}}
    merged = lk.merge_config_files(shipped, retuned)
    assert merged["33"]["2"]["16"]["3584"]["37888"] == {"block_m": 32}
    assert merged["33"]["2"]["512"] == shipped["33"]["2"]["512"]
    assert shipped["33"]["2"]["16"]["3584"]["37888"] == {"block_m": 16}  # the input is left as it was
