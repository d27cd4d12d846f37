"""Mixed training data through POST /v1/fine_tuning/jobs: the `lorafleet.datasets` extension (the seeds'
`swift sft --dataset 'alpaca-gpt4-data-zh#500' 'self-cognition#500'`), against the fake trainer; the manifest
it writes is then read by the real trainer's parser and dataset loader."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from lorafleet_trainer.datasets import load_training_examples
from lorafleet_trainer.manifest import parse_manifest
from tests.gateway.gateway_harness import BASE_MODEL, Stack
from tests.gateway.test_files_fine_tuning import error_of, manifest_of, upload

IDENTITY = [{"instruction": f"identity {i}", "output": f"I am Fleet {i}."} for i in range(5)]
GENERAL = [{"instruction": f"general {i}", "input": "", "output": f"answer {i}"} for i in range(20)]
CHATS = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def test_mixed_datasets_reach_the_manifest_and_the_job_object(gw: Stack, client: openai.OpenAI) -> None:
    identity = upload(client, jsonl(IDENTITY), "self_cognition.jsonl")
    general = upload(client, jsonl(GENERAL), "general.jsonl")
    chats = upload(client, jsonl(CHATS), "chats.jsonl")
    job = client.fine_tuning.jobs.create(
        model=BASE_MODEL,
        training_file=identity,
        extra_body={
            "lorafleet": {
                "training_file_samples": 8,
                "datasets": [f"{general}#12", {"file": chats, "format": "messages"}],
            }
        },
    )
    want = [
        {"file": identity, "samples": 8, "format": "auto"},
        {"file": general, "samples": 12, "format": "auto"},
        {"file": chats, "samples": None, "format": "messages"},
    ]
    assert job.model_extra is not None and job.model_extra["lorafleet"]["datasets"] == want
    assert job.training_file == identity
    assert client.fine_tuning.jobs.retrieve(job.id).model_extra["lorafleet"]["datasets"] == want  # type: ignore[index]
    listed = {j.id: j for j in client.fine_tuning.jobs.list(limit=100)}
    assert listed[job.id].model_extra["lorafleet"]["datasets"] == want  # type: ignore[index]

    manifest = manifest_of(gw, job.id)
    assert manifest["datasets"] == [
        {"uri": f"files/default/{identity}", "format": "auto", "samples": 8},
        {"uri": f"files/default/{general}", "format": "auto", "samples": 12},
        {"uri": f"files/default/{chats}", "format": "messages"},
    ]
    # The real trainer accepts that manifest and mixes exactly those rows from the tenant's files.
    parsed = parse_manifest(json.dumps(manifest).encode(), max_lora_rank=64)
    examples, reports = load_training_examples(parsed.datasets, gw.store, None, seed=parsed.training.seed)
    assert [(r.uri, r.rows, r.used) for r in reports] == [
        (f"files/default/{identity}", 5, 8),  # 8 > 5 rows: one whole pass plus 3 sampled
        (f"files/default/{general}", 20, 12),
        (f"files/default/{chats}", 1, 1),
    ]
    assert len(examples) == 21


def test_a_plain_job_reports_its_training_file(gw: Stack, client: openai.OpenAI) -> None:
    file_id = upload(client)
    job = client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=file_id)
    assert job.model_extra is not None
    assert job.model_extra["lorafleet"]["datasets"] == [{"file": file_id, "samples": None, "format": "auto"}]
    assert manifest_of(gw, job.id)["datasets"] == [{"uri": f"files/default/{file_id}", "format": "auto"}]


def test_each_dataset_file_is_checked_like_training_file(gw: Stack, client: openai.OpenAI) -> None:
    mine = upload(client)
    tenant = gw.new_tenant()
    theirs = upload(gw.gateway.client(api_key=gw.new_key(tenant)["key"]))
    before = len(gw.trainer.create_requests)
    for bad in (
        "file-000000000000000000000000",  # never uploaded
        theirs,  # another tenant's: answers like a missing one
        f"s3://lorafleet/files/{tenant}/{theirs}",  # raw store keys and URIs are not file ids
        "file:///etc/passwd",
        f"files/{tenant}/{theirs}",
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(
                model=BASE_MODEL, training_file=mine, extra_body={"lorafleet": {"datasets": [mine, {"file": bad}]}}
            )
        assert err.value.param == "lorafleet.datasets[1].file", bad  # type: ignore[attr-defined]
        assert repr(bad) in err.value.message
    assert len(gw.trainer.create_requests) == before  # none of these reached the trainer


@pytest.mark.parametrize(
    ("datasets", "param"),
    [
        (["{mine}#many"], "lorafleet.datasets[0]"),
        (["{mine}#0"], "lorafleet.datasets[0].samples"),
        ([{"file": "{mine}", "samples": 10**9}], "lorafleet.datasets[0].samples"),
        ([{"file": "{mine}", "format": "csv"}], "lorafleet.datasets[0].format"),
        ([{"uri": "file:///etc/passwd"}], "lorafleet.datasets[0].file"),  # no uri field: ids only
        (["{mine}"] * 17, "lorafleet.datasets"),
    ],
)
def test_bad_dataset_entries_are_400_naming_the_field(
    gw: Stack, client: openai.OpenAI, datasets: Any, param: str
) -> None:
    mine = upload(client)
    filled = json.loads(json.dumps(datasets).replace("{mine}", mine))
    with gw.gateway.http() as http:
        body = {"model": BASE_MODEL, "training_file": mine, "lorafleet": {"datasets": filled}}
        response = http.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param, response.text


def test_training_file_samples_is_checked(gw: Stack, client: openai.OpenAI) -> None:
    mine = upload(client)
    with gw.gateway.http() as http:
        body = {"model": BASE_MODEL, "training_file": mine, "lorafleet": {"training_file_samples": 0}}
        response = http.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 400
    assert error_of(response)["param"] == "lorafleet.training_file_samples"
