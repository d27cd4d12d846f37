"""QLoRA (lora.quantization: nf4) needs a CUDA GPU: a trainer without one refuses the job before loading anything."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lorafleet.trainer.v1 import trainer_pb2 as S
from lorafleet_common.store import LocalStore
from lorafleet_trainer import train_loop
from lorafleet_trainer.manifest import LoraSpec

from .conftest import StartTrainer, seed_dataset, stub_for, tiny_manifest, watch_until_final

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")

REFUSAL = "QLoRA (lora.quantization: nf4) needs a CUDA GPU; this trainer has none"


def test_loading_a_4bit_base_without_cuda_is_refused_before_any_load(embedded_model_path: Path) -> None:
    lora = LoraSpec(quantization="nf4")
    cpu = torch.device("cpu")
    assert train_loop.quantization_problem(lora, cpu) == REFUSAL
    assert train_loop.quantization_problem(LoraSpec(), cpu) is None
    with pytest.raises(train_loop.QuantizationUnavailable, match="needs a CUDA GPU"):
        train_loop.load_lora_model(str(embedded_model_path), lora, 0, cpu, local_only=True)
    assert "bitsandbytes" not in sys.modules


async def test_a_qlora_job_fails_in_validation_with_the_reason(trainer_home: Path, start_trainer: StartTrainer) -> None:
    app = await start_trainer(trainer_home)
    store = LocalStore(trainer_home / "store")
    store.put("d.jsonl", seed_dataset())
    manifest = json.loads(tiny_manifest("q", "d.jsonl"))
    manifest["lora"]["quantization"] = "nf4"
    store.put("qlora.json", json.dumps(manifest).encode())
    channel, stub = stub_for(app)
    async with channel:
        await stub.CreateJob(S.CreateJobRequest(manifest_uri="qlora.json", job_id="qlora"))
        events = await watch_until_final(stub, "qlora", timeout=180)
        job = await stub.GetJob(S.GetJobRequest(job_id="qlora"))
    assert job.state == S.JOB_STATE_FAILED and job.error == REFUSAL
    assert S.JOB_STATE_RUNNING not in [e.state for e in events]
    assert not any("reading" in e.message for e in events)  # refused before the datasets were read
    assert store.list("adapters") == []
