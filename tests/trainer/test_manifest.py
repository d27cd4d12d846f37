"""Manifest parsing: YAML and JSON, the "uri#N" short form, defaults, every error with its field path."""

from __future__ import annotations

import json

import pytest

from lorafleet_trainer.manifest import ManifestError, parse_manifest

YAML_MANIFEST = b"""
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
adapter_name: self-cognition
datasets:
  - uri: datasets/self_cognition.jsonl
    format: alpaca
  - "s3://lorafleet/datasets/alpaca_zh.jsonl#500"
system_prompt: "You are a helpful assistant."
lora: {rank: 8, alpha: 32}
training: {epochs: 5, learning_rate: 1.0e-3}
labels: {team: research}
"""


def test_yaml_manifest_with_short_form_and_defaults() -> None:
    manifest = parse_manifest(YAML_MANIFEST, max_lora_rank=16)
    assert manifest.adapter_name == "self-cognition"
    first, second = manifest.datasets
    assert (first.uri, first.format, first.samples) == ("datasets/self_cognition.jsonl", "alpaca", None)
    assert (second.uri, second.format, second.samples) == ("s3://lorafleet/datasets/alpaca_zh.jsonl", "auto", 500)
    assert manifest.training.epochs == 5 and manifest.training.learning_rate == 1e-3
    # Everything not given takes the documented default.
    assert manifest.training.batch_size == 1 and manifest.training.gradient_accumulation_steps == 16
    assert manifest.training.warmup_ratio == 0.05 and manifest.training.max_length == 2048
    assert manifest.training.seed == 42
    assert manifest.lora.dropout == 0.05 and manifest.lora.target_modules == "all-linear"
    assert manifest.labels == {"team": "research"}


def test_json_manifest_minimal() -> None:
    data = json.dumps({"base_model": "m", "adapter_name": "a", "datasets": ["data.jsonl"]}).encode()
    manifest = parse_manifest(data, max_lora_rank=16)
    assert manifest.system_prompt is None
    assert manifest.lora.rank == 8 and manifest.lora.alpha == 32
    assert manifest.training.learning_rate == 1e-4 and manifest.training.epochs == 3
    assert manifest.datasets[0].uri == "data.jsonl" and manifest.datasets[0].samples is None


def test_hash_without_count_is_part_of_the_uri() -> None:
    data = json.dumps({"base_model": "m", "adapter_name": "a", "datasets": ["data#v2.jsonl"]}).encode()
    assert parse_manifest(data, max_lora_rank=16).datasets[0].uri == "data#v2.jsonl"


def _problems(data: dict[str, object] | bytes) -> list[str]:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    with pytest.raises(ManifestError) as info:
        parse_manifest(raw, max_lora_rank=16)
    return info.value.problems


def test_every_problem_is_reported_with_its_field_path() -> None:
    problems = _problems(
        {
            "adapter_name": "../escape",
            "datasets": [{"uri": "x.jsonl", "format": "csv", "samples": 0}, "y.jsonl#0"],
            "lora": {"rank": 0, "dropout": 1.5, "target_modules": []},
            "training": {"learning_rate": 0, "epochs": 0, "batch_size": -1, "warmup_ratio": 1, "bogus": 1},
            "surprise": True,
        }
    )
    text = "\n".join(problems)
    for expected in [
        "base_model: is required",
        "adapter_name: invalid adapter name",
        "datasets[0].format:",
        "datasets[0].samples: must be >= 1",
        "datasets[1].samples: must be >= 1",  # "y.jsonl#0"
        "lora.rank: must be >= 1",
        "lora.dropout: must be < 1",
        "lora.target_modules:",
        "training.learning_rate: must be > 0",
        "training.epochs: must be >= 1",
        "training.batch_size: must be >= 1",
        "training.warmup_ratio: must be < 1",
        "training.bogus: unknown field",
        "surprise: unknown field",
    ]:
        assert expected in text, f"{expected!r} missing from:\n{text}"


def test_empty_dataset_list_and_wrong_types() -> None:
    problems = _problems({"base_model": "m", "adapter_name": "a", "datasets": [], "training": {"seed": "x"}})
    assert "datasets: must not be empty" in problems
    assert any(p.startswith("training.seed:") for p in problems)


def test_rank_above_serving_limit_is_refused() -> None:
    problems = _problems({"base_model": "m", "adapter_name": "a", "datasets": ["d"], "lora": {"rank": 32}})
    assert problems == ["lora.rank: LoRA rank 32 exceeds this server's max_lora_rank 16"]


def test_unservable_target_module_is_refused() -> None:
    problems = _problems(
        {"base_model": "m", "adapter_name": "a", "datasets": ["d"], "lora": {"target_modules": ["q_proj", "lm_head"]}}
    )
    assert len(problems) == 1 and problems[0].startswith("lora.target_modules: unsupported target modules ['lm_head']")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"- just\n- a list\n", "manifest: must be a mapping"),
        (b"base_model: [unclosed", "manifest: neither valid JSON nor YAML"),
        (b"\xff\xfe", "manifest: not UTF-8"),
    ],
)
def test_unreadable_manifests(data: bytes, expected: str) -> None:
    assert _problems(data)[0].startswith(expected)
