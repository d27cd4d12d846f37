"""Adapter folder validation: every rule, nothing unpickled, all problems at once."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

from lorafleet_inference.validation import validate_adapter_dir
from tests.inference.inference_helpers import EvilPickle, metadata_for

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def validate(folder: Path, max_rank: int = 16, **metadata: object) -> list[str]:
    return validate_adapter_dir(
        folder, metadata=metadata_for(folder, "a", "v1", **metadata), max_rank=max_rank, base_model=BASE
    )


def test_a_good_adapter_passes(adapter_dir: Callable[..., Path]) -> None:
    assert validate(adapter_dir()) == []


def test_pickle_weights_are_refused_without_being_loaded(adapter_dir: Callable[..., Path], tmp_path: Path) -> None:
    folder = adapter_dir()
    marker = tmp_path / "pwned"
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(EvilPickle(marker)))
    (folder / "training_args.pt").write_bytes(pickle.dumps(EvilPickle(marker)))
    problems = validate(folder)
    assert any("adapter_model.bin" in p and "pickle" in p for p in problems), problems
    assert any("training_args.pt" in p for p in problems), problems
    assert not marker.exists()


def test_a_pickle_named_safetensors_is_refused_without_being_loaded(
    adapter_dir: Callable[..., Path], tmp_path: Path
) -> None:
    folder = adapter_dir()
    marker = tmp_path / "pwned"
    (folder / "adapter_model.safetensors").write_bytes(pickle.dumps(EvilPickle(marker)))
    problems = validate(folder, sha256="0" * 64)
    assert any("not a valid safetensors file" in p for p in problems), problems
    assert not marker.exists()


def test_rank_above_the_limit_is_refused(adapter_dir: Callable[..., Path]) -> None:
    problems = validate(adapter_dir(rank=32), max_rank=16)
    assert problems == ["LoRA rank 32 exceeds this server's max_lora_rank 16"]


def test_tensor_shapes_cannot_understate_the_rank(adapter_dir: Callable[..., Path]) -> None:
    problems = validate(adapter_dir(rank=8, tensor_rank=32), max_rank=16)
    assert len(problems) == 1 and "rank-32" in problems[0] and "r=8" in problems[0]


def test_dora_modules_to_save_and_bias_are_refused(adapter_dir: Callable[..., Path]) -> None:
    folder = adapter_dir(config={"use_dora": True, "modules_to_save": ["lm_head"], "bias": "all"})
    problems = validate(folder)
    assert len(problems) == 3
    assert any("DoRA" in p for p in problems)
    assert any("modules_to_save" in p for p in problems)
    assert any("bias" in p for p in problems)


def test_lora_on_lm_head_or_embeddings_is_refused(adapter_dir: Callable[..., Path]) -> None:
    folder = adapter_dir(
        extra_tensors={
            "base_model.model.lm_head.lora_A.weight": (8, 16),
            "base_model.model.lm_head.lora_B.weight": (32, 8),
        }
    )
    problems = validate(folder)
    assert len(problems) == 2 and all("lm_head" in p for p in problems), problems


def test_full_weights_are_refused(adapter_dir: Callable[..., Path]) -> None:
    folder = adapter_dir(extra_tensors={"base_model.model.model.norm.weight": (16,)})
    assert any("is not a LoRA A/B weight" in p for p in validate(folder))


def test_base_model_mismatch_is_refused(adapter_dir: Callable[..., Path]) -> None:
    problems = validate(adapter_dir(), base_model="Qwen/Qwen2.5-7B-Instruct")
    assert problems == [f"adapter was trained on 'Qwen/Qwen2.5-7B-Instruct', this server serves {BASE!r}"]


def test_sha256_mismatch_is_refused(adapter_dir: Callable[..., Path]) -> None:
    problems = validate(adapter_dir(), sha256="ab" * 32)
    assert len(problems) == 1 and "does not match metadata.sha256" in problems[0]


def test_unsupported_target_modules_are_refused(adapter_dir: Callable[..., Path]) -> None:
    problems = validate(adapter_dir(config={"target_modules": ["q_proj", "embed_tokens"]}))
    assert any("unsupported target modules ['embed_tokens']" in p for p in problems), problems


def test_missing_files_and_bad_json_are_reported(adapter_dir: Callable[..., Path]) -> None:
    folder = adapter_dir()
    metadata = metadata_for(folder, "a", "v1")
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_config.json").write_text("{not json")
    problems = validate_adapter_dir(folder, metadata=metadata, max_rank=16, base_model=BASE)
    assert any("adapter_model.safetensors is missing" in p for p in problems)
    assert any("not valid JSON" in p for p in problems)


def test_every_problem_is_reported_at_once(adapter_dir: Callable[..., Path], tmp_path: Path) -> None:
    folder = adapter_dir(
        rank=64,
        config={"use_dora": True, "bias": "lora_only"},
        extra_tensors={"base_model.model.model.embed_tokens.lora_embedding_A": (64, 16)},
    )
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(EvilPickle(tmp_path / "pwned")))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == 64
    problems = validate(folder, max_rank=16, sha256="cd" * 32, base_model="meta-llama/Llama-3.1-8B")
    expected = ["adapter_model.bin", "rank 64", "DoRA", "bias", "embed_tokens", "sha256", "Llama-3.1-8B"]
    for needle in expected:
        assert any(needle in p for p in problems), (needle, problems)
    assert not (tmp_path / "pwned").exists()
