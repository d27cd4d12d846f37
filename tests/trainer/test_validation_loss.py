"""Validation loss: the eval function against a manual computation, and eval_loss on a real trainer job's events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lorafleet.trainer.v1 import trainer_pb2
from lorafleet_common.store import LocalStore
from lorafleet_trainer import train_loop
from lorafleet_trainer.datasets import Example, Message
from lorafleet_trainer.evaluate import eval_loss, evaluation_due, split_validation
from lorafleet_trainer.manifest import LoraSpec, ManifestError, parse_manifest
from lorafleet_trainer.tokenize import IGNORE_INDEX, ChatTokenizer, TokenizedExample

from .conftest import StartTrainer, seed_dataset, stub_for, tiny_manifest, watch_until_final

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def rows(embedded_model_path: Path) -> list[TokenizedExample]:
    from transformers import AutoTokenizer

    chat = ChatTokenizer(AutoTokenizer.from_pretrained(embedded_model_path))
    pairs = [("Hi!", "Hello."), ("Your name?", "Swift-Robot, at your service."), ("2+2?", "4."), ("Who?", "CSDN.")]
    return [chat.encode((Message("user", q), Message("assistant", a)), "Be brief.") for q, a in pairs]


def test_eval_loss_is_the_mean_token_loss_without_dropout_or_rng_draws(
    embedded_model_path: Path, rows: list[TokenizedExample]
) -> None:
    lora = LoraSpec(rank=4, alpha=8, dropout=0.5, target_modules=["q_proj", "v_proj"])
    model = train_loop.load_lora_model(str(embedded_model_path), lora, 0, CPU, local_only=True)
    torch.manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapter (and its dropout) matter
            torch.nn.init.normal_(param, std=0.05)
    model.train()
    rng_before = torch.get_rng_state()

    loss = eval_loss(model, rows, 3, 0, CPU)  # a padded batch of 3, then one of 1

    assert model.training  # back in training mode
    assert torch.equal(torch.get_rng_state(), rng_before)  # the training trajectory is untouched
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:  # one unpadded row at a time, through the plain model forward
            logits = model(input_ids=torch.tensor([row.input_ids])).logits[0, :-1]
            targets = torch.tensor(row.labels[1:])
            total += float(
                torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
            )
            count += int((targets != IGNORE_INDEX).sum())
    assert count == sum(r.trained_tokens for r in rows)
    assert loss == pytest.approx(total / count, rel=1e-4)
    assert eval_loss(model, rows, 3, 0, CPU) == pytest.approx(loss, rel=1e-6)  # deterministic: dropout is off


def test_split_holds_out_a_seeded_share_and_evaluation_falls_on_epoch_ends() -> None:
    examples = [Example((Message("user", str(i)), Message("assistant", "x")), "f", i) for i in range(20)]
    train, held = split_validation(examples, 0.25, 42)
    assert len(held) == 5 and len(train) == 15 and not {e.row for e in train} & {e.row for e in held}
    assert split_validation(examples, 0.25, 42) == (train, held)
    assert split_validation(examples, 0.25, 43)[1] != held
    assert [len(part) for part in split_validation(examples[:2], 0.01, 42)] == [1, 1]  # one row each side at least
    assert [s for s in range(1, 7) if evaluation_due(s, 6, s / 3, 0)] == [3, 6]  # epoch ends only
    assert [s for s in range(1, 7) if evaluation_due(s, 6, s / 3.5, 2)] == [2, 4, 6]


def test_the_manifest_takes_exactly_one_validation_source() -> None:
    base = {"base_model": "m", "adapter_name": "a", "datasets": ["d.jsonl"]}
    manifest = parse_manifest(json.dumps(base | {"validation": {"datasets": ["v.jsonl#3"]}}).encode(), max_lora_rank=16)
    assert manifest.validation is not None and manifest.validation.datasets is not None
    assert manifest.validation.datasets[0].samples == 3 and manifest.validation.every_steps == 0
    for bad, problem in [
        ({"split": 0.1, "datasets": ["v.jsonl"]}, "validation: give exactly one of datasets and split"),
        ({}, "validation: give exactly one of datasets and split"),
        ({"split": 0.5}, "validation.split: must be < 0.5"),
        ({"split": 0.1, "every_steps": -1}, "validation.every_steps: must be >= 0"),
    ]:
        with pytest.raises(ManifestError) as caught:
            parse_manifest(json.dumps(base | {"validation": bad}).encode(), max_lora_rank=16)
        assert problem in caught.value.problems


def with_validation(manifest: bytes, validation: dict[str, Any]) -> str:
    return json.dumps(json.loads(manifest) | {"validation": validation})


async def test_a_job_reports_eval_loss_and_refuses_bad_validation_rows(
    trainer_home: Path, start_trainer: StartTrainer
) -> None:
    app = await start_trainer(trainer_home, torch_threads=1)
    store = LocalStore(trainer_home / "store")
    store.put("datasets/seed.jsonl", seed_dataset())
    store.put("datasets/bad.jsonl", b'{"instruction": "q", "output": "a"}\n{"instruction": "q"}\n')
    good = tiny_manifest("held-out", "datasets/seed.jsonl", batch_size=3)
    store.put("manifests/split.json", with_validation(good, {"split": 0.25, "every_steps": 1}).encode())
    store.put("manifests/bad.json", with_validation(good, {"datasets": ["datasets/bad.jsonl"]}).encode())
    channel, stub = stub_for(app)
    async with channel:
        await stub.CreateJob(trainer_pb2.CreateJobRequest(manifest_uri="manifests/bad.json", job_id="job-bad"))
        await stub.CreateJob(trainer_pb2.CreateJobRequest(manifest_uri="manifests/split.json", job_id="job-split"))

        bad = await watch_until_final(stub, "job-bad")
        assert bad[-1].state == trainer_pb2.JOB_STATE_FAILED
        assert "validation data" in bad[-1].message
        assert any("file datasets/bad.jsonl, row 2" in e.message and e.kind == "log" for e in bad)

        events = await watch_until_final(stub, "job-split")
        assert events[-1].state == trainer_pb2.JOB_STATE_SUCCEEDED, events[-1].message
        assert any("2 of 8 training rows held out" in e.message for e in events)
        progress = [e.progress for e in events if e.kind == "progress"]
        assert [p.step for p in progress] == [1, 2]  # 6 training rows in batches of 3
        assert all(p.HasField("eval_loss") and p.eval_loss > 0 for p in progress)
        assert progress[-1].eval_loss < progress[0].eval_loss  # lr 1e-3 on rows of the same kind
