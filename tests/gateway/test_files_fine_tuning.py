"""/v1/files and /v1/fine_tuning/jobs through the official openai client, against the fake trainer."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import httpx
import openai
import pytest

from tests.gateway.gateway_harness import BASE_MODEL, Stack

ROWS = [
    {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Fleet."}]},
    {"instruction": "Name yourself", "output": "Fleet"},
]
JSONL = ("\n".join(json.dumps(r) for r in ROWS) + "\n").encode()


def upload(client: openai.OpenAI, data: bytes = JSONL, name: str = "train.jsonl") -> str:
    return client.files.create(file=(name, io.BytesIO(data)), purpose="fine-tune").id


def manifest_of(gw: Stack, job_id: str, tenant: str = "default") -> dict[str, Any]:
    return json.loads(gw.store.get(f"manifests/{tenant}/{job_id}.json"))


def test_files_lifecycle(gw: Stack, client: openai.OpenAI) -> None:
    created = client.files.create(file=("train.jsonl", io.BytesIO(JSONL)), purpose="fine-tune")
    assert re.fullmatch(r"file-[0-9a-f]{24}", created.id)
    assert (created.object, created.purpose, created.filename, created.bytes) == (
        "file",
        "fine-tune",
        "train.jsonl",
        len(JSONL),
    )
    # The admin key acts as the built-in "default" tenant: its files live in that namespace.
    assert gw.store.get(f"files/default/{created.id}") == JSONL
    assert json.loads(gw.store.get(f"files/default/{created.id}.json"))["id"] == created.id

    assert created.id in [f.id for f in client.files.list()]
    assert client.files.retrieve(created.id).bytes == len(JSONL)
    assert client.files.content(created.id).content == JSONL

    deleted = client.files.delete(created.id)
    assert deleted.deleted and deleted.id == created.id
    assert not gw.store.exists(f"files/default/{created.id}")
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-does-not-exist")


@pytest.mark.parametrize(
    ("data", "purpose", "param"),
    [
        (JSONL, "assistants", "purpose"),
        (b'{"ok": 1}\nnot json\n', "fine-tune", "file"),
        (b"[1, 2]\n", "fine-tune", "file"),
        (b"\n\n", "fine-tune", "file"),
    ],
)
def test_files_rejects_bad_uploads(gw: Stack, data: bytes, purpose: str, param: str) -> None:
    with gw.gateway.http() as http:
        response = http.post("/v1/files", files={"file": ("x.jsonl", data)}, data={"purpose": purpose})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_file_upload_limit_413(gw: Stack) -> None:
    with gw.gateway.http() as http:
        big = b'{"a": "' + b"x" * (1024 * 1024) + b'"}\n'
        response = http.post("/v1/files", files={"file": ("x.jsonl", big)}, data={"purpose": "fine-tune"})
    assert response.status_code == 413


def test_create_job_writes_manifest_and_calls_trainer(gw: Stack, client: openai.OpenAI) -> None:
    file_id = upload(client)
    job = client.fine_tuning.jobs.create(
        model=BASE_MODEL,
        training_file=file_id,
        suffix="demo",
        seed=7,
        hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 2.0},
        extra_body={
            "lorafleet": {
                "lora": {"rank": 16, "alpha": 32, "target_modules": "all-linear"},
                "resources": {"devices": 2},
                "training": {"max_length": 1024},
                "system_prompt": "You are Fleet.",
            }
        },
    )
    assert re.fullmatch(r"ftjob-[0-9a-f]{12}", job.id)
    short = job.id.removeprefix("ftjob-")
    assert job.object == "fine_tuning.job" and job.status == "queued"
    assert job.model == BASE_MODEL and job.training_file == file_id
    assert job.fine_tuned_model is None and job.finished_at is None and job.error is None
    assert job.seed == 7
    assert job.hyperparameters.n_epochs == 2
    assert job.hyperparameters.batch_size == 4
    assert job.hyperparameters.learning_rate_multiplier == 2.0

    request = gw.trainer.create_requests[-1]
    assert request.manifest_uri == f"manifests/default/{job.id}.json"
    assert request.job_id == job.id
    assert {k: request.labels[k] for k in ("tenant", "training_file", "suffix", "model")} == {
        "tenant": "default",
        "training_file": file_id,
        "suffix": "demo",
        "model": BASE_MODEL,
    }
    manifest = manifest_of(gw, job.id)
    assert manifest["base_model"] == BASE_MODEL
    assert manifest["adapter_name"] == f"default/ft:smollm2-135m-instruct:default:demo:{short}"
    assert manifest["datasets"] == [{"uri": f"files/default/{file_id}", "format": "auto"}]
    assert manifest["training"] == {
        "seed": 7,
        "epochs": 2,
        "batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": pytest.approx(2e-4),
        "max_length": 1024,
    }
    assert manifest["lora"] == {"rank": 16, "alpha": 32, "target_modules": "all-linear"}
    assert manifest["resources"] == {"devices": 2}
    assert manifest["system_prompt"] == "You are Fleet."
    assert manifest["labels"]["training_file"] == file_id


def test_job_lifecycle_retrieve_events_list(gw: Stack, client: openai.OpenAI) -> None:
    file_id = upload(client)
    job = client.fine_tuning.jobs.create(
        model=BASE_MODEL,
        training_file=file_id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
    )
    manifest = manifest_of(gw, job.id)
    fine_tuned_model = f"ft:smollm2-135m-instruct:default:custom:{job.id.removeprefix('ftjob-')}"
    assert manifest["adapter_name"] == f"default/{fine_tuned_model}"
    assert manifest["training"] == {"seed": 42, "epochs": 1}
    assert "lora" not in manifest and "system_prompt" not in manifest
    assert job.hyperparameters.batch_size == "auto"

    gw.loop.call(lambda: gw.trainer.run_to_success(job.id, steps=3))
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded"
    assert done.fine_tuned_model == fine_tuned_model
    assert done.trained_tokens == 1234
    assert isinstance(done.finished_at, int) and done.finished_at >= done.created_at

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    assert events[0].message.startswith("Adapter ft:")  # newest first
    assert events[-1].message == "Job queued"
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == [3, 2, 1]  # type: ignore[index]
    assert set(metrics[0].data) == {"step", "total_steps", "train_loss", "learning_rate", "tokens_per_second", "epoch"}  # type: ignore[arg-type]
    assert metrics[0].data["train_loss"] == pytest.approx(2.0 / 3)  # type: ignore[index]
    assert all(e.object == "fine_tuning.job.event" and e.level == "info" for e in events)

    first_page = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert [e.id for e in first_page.data] == [e.id for e in events[:2]] and first_page.has_more
    second = client.fine_tuning.jobs.list_events(job.id, limit=2, after=first_page.data[-1].id)
    assert [e.id for e in second.data] == [e.id for e in events[2:4]]
    assert [e.id for e in first_page.iter_pages().__next__().data] == [e.id for e in events[:2]]

    listed = client.fine_tuning.jobs.list(limit=1)
    assert len(listed.data) == 1 and listed.has_more
    all_ids = [j.id for j in client.fine_tuning.jobs.list(limit=100)]
    assert job.id in all_ids
    assert [j.id for j in client.fine_tuning.jobs.list(limit=100, after=all_ids[0])] == all_ids[1:]


def test_cancel(gw: Stack, client: openai.OpenAI) -> None:
    job = client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=upload(client))
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"  # idempotent


def error_of(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


def test_job_errors(gw: Stack, client: openai.OpenAI) -> None:
    file_id = upload(client)
    before = len(gw.trainer.create_requests)
    with pytest.raises(openai.NotFoundError) as not_base:
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=file_id)
    assert not_base.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as missing:
        client.fine_tuning.jobs.create(model=BASE_MODEL, training_file="file-000000000000000000000000")
    assert missing.value.param == "training_file"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as missing_validation:
        client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=file_id, validation_file="file-nope")
    assert missing_validation.value.param == "validation_file"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as bad_suffix:
        client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=file_id, suffix="a/b")
    assert bad_suffix.value.param == "suffix"  # type: ignore[attr-defined]
    assert len(gw.trainer.create_requests) == before  # none of these reached the trainer

    # The trainer's own validation comes back as a 400 with its message; the manifest is cleaned up.
    with pytest.raises(openai.BadRequestError, match=r"training\.learning_rate: must be > 0"):
        client.fine_tuning.jobs.create(
            model=BASE_MODEL, training_file=file_id, extra_body={"lorafleet": {"training": {"learning_rate": -1}}}
        )
    rejected = gw.trainer.create_requests[-1]
    assert not gw.store.exists(rejected.manifest_uri)

    with gw.gateway.http() as http:
        body = {"model": BASE_MODEL, "training_file": file_id}
        typo = http.post("/v1/fine_tuning/jobs", json={**body, "lorafleet": {"lorra": {}}})
        assert typo.status_code == 400 and error_of(typo)["param"] == "lorafleet.lorra"
        dpo = http.post("/v1/fine_tuning/jobs", json={**body, "method": {"type": "dpo"}})
        assert dpo.status_code == 400 and error_of(dpo)["param"] == "method.type"
        epochs = http.post("/v1/fine_tuning/jobs", json={**body, "hyperparameters": {"n_epochs": 0}})
        assert epochs.status_code == 400 and error_of(epochs)["param"] == "hyperparameters.n_epochs"
        for path in ("/v1/fine_tuning/jobs/ftjob-000000000000", "/v1/fine_tuning/jobs/..%2Fx/events"):
            response = http.get(path)
            assert response.status_code == 404 and error_of(response)["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.cancel("ftjob-000000000000")
