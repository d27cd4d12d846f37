"""validation_file becomes the manifest's validation datasets; the trainer's eval_loss becomes OpenAI's valid loss."""

from __future__ import annotations

import openai

from lorafleet.trainer.v1 import trainer_pb2
from lorafleet_gateway.fine_tuning.view import checkpoint_object, event_object
from tests.gateway.gateway_harness import BASE_MODEL, Stack
from tests.gateway.test_files_fine_tuning import manifest_of, upload


def test_validation_file_reaches_the_manifest(gw: Stack, client: openai.OpenAI) -> None:
    training, validation = upload(client), upload(client, name="valid.jsonl")
    job = client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=training, validation_file=validation)
    manifest = manifest_of(gw, job.id)
    assert manifest["validation"] == {"datasets": [{"uri": f"files/default/{validation}", "format": "auto"}]}
    assert manifest["datasets"] == [{"uri": f"files/default/{training}", "format": "auto"}]
    assert job.validation_file == validation

    plain = client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=training)
    assert "validation" not in manifest_of(gw, plain.id) and plain.validation_file is None


def test_eval_loss_is_reported_as_the_full_validation_loss() -> None:
    job = trainer_pb2.Job(id="ftjob-abc", adapter_name="default/ft:m:default:custom:abc")
    progress = trainer_pb2.Progress(step=2, total_steps=4, loss=1.5, eval_loss=1.25)
    event = trainer_pb2.JobEvent(seq=5, job_id=job.id, kind="progress", progress=progress)
    data = event_object(event, job, "default")["data"]
    assert data["train_loss"] == 1.5 and data["valid_loss"] == data["full_valid_loss"] == 1.25

    progress.ClearField("eval_loss")
    event.progress.CopyFrom(progress)
    assert "full_valid_loss" not in event_object(event, job, "default")["data"]  # a step that did not evaluate

    checkpoint = trainer_pb2.JobEvent(seq=6, job_id=job.id, kind="checkpoint", progress=progress)
    assert checkpoint_object(checkpoint, None)["metrics"]["full_valid_loss"] is None
    progress.eval_loss = 0.5
    checkpoint.progress.CopyFrom(progress)
    metrics = checkpoint_object(checkpoint, None)["metrics"]
    assert metrics["valid_loss"] == metrics["full_valid_loss"] == 0.5 and metrics["train_loss"] == 1.5
