"""Names that reach paths, the adapter layout, and the serving rules shared by trainer and inference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafleet_common.adapters import (
    AdapterMetadata,
    AdapterNotFound,
    check_adapter_config,
    check_weight_names,
    delete_adapter,
    list_adapter_names,
    publish_adapter,
    read_metadata,
    resolve_version,
)
from lorafleet_common.names import InvalidName, parse_adapter_ref
from lorafleet_common.store import LocalStore


@pytest.mark.parametrize(
    "ref", ["../x", "/abs", "a/../../b", "x" * 300, "%2e%2e", "a@../v", "", "a b", "a\\b", "-lead", "a/", ".."]
)
def test_bad_refs(ref: str) -> None:
    with pytest.raises(InvalidName):
        parse_adapter_ref(ref)


def test_good_refs() -> None:
    assert str(parse_adapter_ref("ft:smollm2:self-cognition:abc")) == "ft:smollm2:self-cognition:abc"
    ref = parse_adapter_ref("tenant-a/support.v2@20261122-1")
    assert (ref.name, ref.version) == ("tenant-a/support.v2", "20261122-1")


def _folder(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"weights-" + name.encode())
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8}))
    return folder


def _meta(name: str, version: str) -> AdapterMetadata:
    return AdapterMetadata(name=name, version=version, base_model="b", rank=8, alpha=16, target_modules=[], sha256="0")


def test_publish_resolve_list_delete(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    publish_adapter(store, _folder(tmp_path, "v1"), _meta("ident", "v1"))
    publish_adapter(store, _folder(tmp_path, "v2"), _meta("ident", "v2"))
    publish_adapter(store, _folder(tmp_path, "o"), _meta("team/other", "1"))
    assert list_adapter_names(store) == ["ident", "team/other"]
    assert resolve_version(store, parse_adapter_ref("ident")) == "v2"
    assert resolve_version(store, parse_adapter_ref("ident@v1")) == "v1"
    assert read_metadata(store, "ident", "v1").version == "v1"
    with pytest.raises(AdapterNotFound):
        resolve_version(store, parse_adapter_ref("ident@v9"))
    with pytest.raises(AdapterNotFound):
        resolve_version(store, parse_adapter_ref("nope"))
    publish_adapter(store, _folder(tmp_path, "nested"), _meta("ident/nested", "1"))
    assert delete_adapter(store, "ident")
    assert list_adapter_names(store) == ["ident/nested", "team/other"]
    assert not delete_adapter(store, "ident")


def test_serving_rules_report_every_problem() -> None:
    config = {
        "r": 64,
        "use_dora": True,
        "modules_to_save": ["lm_head"],
        "bias": "all",
        "target_modules": ["q_proj", "embed_tokens"],
    }
    meta = _meta("x", "1")
    problems = check_adapter_config(config, max_rank=16, base_model="other-base", metadata=meta)
    text = "\n".join(problems)
    for needle in ("rank 64", "DoRA", "modules_to_save", "bias", "embed_tokens", "trained on 'b'"):
        assert needle in text
    assert check_adapter_config({"r": 8, "target_modules": "all-linear"}, max_rank=16) == []
    assert check_weight_names(["base_model.model.lm_head.lora_A.weight", "model.layers.0.mlp.up_proj.weight"])
    assert check_weight_names(["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"]) == []
