"""GET /v1/fine_tuning/jobs/{id}/events/stream: a job's events as live server-sent events (WatchJob behind)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from lorafleet.trainer.v1 import trainer_pb2
from tests.gateway.gateway_harness import BASE_MODEL, Gateway, Stack, wait_for

JSONL = b'{"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Fleet."}]}\n'


def new_job(client: openai.OpenAI) -> str:
    file_id = client.files.create(file=("train.jsonl", io.BytesIO(JSONL)), purpose="fine-tune").id
    return client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=file_id).id


def messages(response: httpx.Response) -> Iterator[tuple[str | None, str]]:
    """(id, data) of each SSE message; comments are skipped."""
    event_id, data = None, []
    for line in response.iter_lines():
        if not line:
            if data:
                yield event_id, "\n".join(data)
            event_id, data = None, []
        elif line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data.append(line[6:])


def read_stream(gateway: Gateway, job_id: str, **kwargs: Any) -> list[tuple[str | None, str]]:
    with gateway.http() as http, http.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events/stream", **kwargs) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(messages(r))


@pytest.fixture
def auto_trainer(gw: Stack) -> Iterator[Callable[[int, float], None]]:
    """Make created jobs run by themselves (steps, seconds per step); back to manual afterwards."""

    def configure(steps: int, delay_s: float) -> None:
        gw.trainer.auto_steps, gw.trainer.step_delay_s = steps, delay_s

    yield configure
    gw.trainer.auto_steps = 0


def test_finished_job_replays_every_event_then_done(gw: Stack, client: openai.OpenAI) -> None:
    job_id = new_job(client)
    gw.loop.call(lambda: gw.trainer.run_to_success(job_id, steps=4))
    stream = read_stream(gw.gateway, job_id)
    assert stream[-1] == (None, "[DONE]")
    events = [json.loads(data) for _, data in stream[:-1]]
    assert [event_id for event_id, _ in stream[:-1]] == [e["id"] for e in events]  # ids for Last-Event-ID
    # The same objects as the paged API, oldest first instead of newest first.
    listed = client.fine_tuning.jobs.list_events(job_id, limit=100).data
    assert events == [e.model_dump(exclude_unset=True) for e in reversed(listed)]
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1]["train_loss"] == pytest.approx(0.5)
    assert events[0]["message"] == "Job queued" and events[-1]["message"].startswith("Adapter ft:")

    job = client.fine_tuning.jobs.retrieve(job_id).model_dump()
    assert job["lorafleet"]["step"] == job["lorafleet"]["total_steps"] == 4
    assert job["lorafleet"]["loss"] == pytest.approx(0.5)


def test_resume_with_last_event_id(gw: Stack, client: openai.OpenAI) -> None:
    job_id = new_job(client)
    gw.loop.call(lambda: gw.trainer.run_to_success(job_id, steps=3))
    everything = read_stream(gw.gateway, job_id)
    third = everything[2][0]
    assert third is not None
    assert read_stream(gw.gateway, job_id, headers={"Last-Event-ID": third}) == everything[3:]
    assert read_stream(gw.gateway, job_id, params={"after": third}) == everything[3:]
    # Resuming after the last event of a finished job: nothing more, and it says so.
    assert read_stream(gw.gateway, job_id, headers={"Last-Event-ID": str(everything[-2][0])}) == [(None, "[DONE]")]
    with gw.gateway.http() as http:
        bad = http.get(f"/v1/fine_tuning/jobs/{job_id}/events/stream", headers={"Last-Event-ID": "nope"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"


def test_running_job_streams_live(gw: Stack, client: openai.OpenAI, auto_trainer: Callable[[int, float], None]) -> None:
    auto_trainer(6, 0.05)
    job_id = new_job(client)
    seen_while_running = []
    with gw.gateway.http() as http, http.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events/stream") as r:
        steps = []
        for _, data in messages(r):
            if data == "[DONE]":
                break
            event = json.loads(data)
            if event["type"] == "metrics":
                steps.append(event["data"]["step"])
                seen_while_running.append(gw.trainer.jobs[job_id].state == trainer_pb2.JOB_STATE_RUNNING)
    assert steps == [1, 2, 3, 4, 5, 6]
    assert seen_while_running[0], "the first step should arrive while the job is still running"
    assert client.fine_tuning.jobs.retrieve(job_id).status == "succeeded"


def test_keepalive_and_cancel_end_the_stream(
    gw: Stack, client: openai.OpenAI, extra_gateway: Callable[..., Gateway]
) -> None:
    gateway = extra_gateway(gw.targets, event_keepalive_s=0.05)
    job_id = new_job(client)  # stays queued: the fake trainer does not run it
    lines = []
    with gateway.http() as http, http.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events/stream") as r:
        for line in r.iter_lines():
            lines.append(line)
            if lines.count(": keepalive") == 3:
                client.fine_tuning.jobs.cancel(job_id)
            if line == "data: [DONE]":
                break
    assert ": keepalive" in lines
    assert any('"Job cancelled"' in line for line in lines)


def test_client_leaving_ends_the_watch(gw: Stack, client: openai.OpenAI) -> None:
    job_id = new_job(client)  # queued: the watch would go on forever
    before = gw.trainer.watching
    with gw.gateway.http() as http, http.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events/stream") as r:
        first = next(messages(r))
        assert json.loads(first[1])["message"] == "Job queued"
        assert gw.trainer.watching == before + 1
    # Generous: noticing a disconnect takes a few loop turns, and CI machines are busy.
    assert wait_for(lambda: gw.trainer.watching == before, timeout=15), (
        "the gateway kept watching after the client left"
    )


def test_other_tenants_job_is_indistinguishable_from_a_missing_one(gw: Stack, client: openai.OpenAI) -> None:
    job_id = new_job(client)  # the admin key's (default tenant) job
    key = gw.new_key(gw.new_tenant())["key"]
    with gw.gateway.http(api_key=key) as http:
        theirs = http.get(f"/v1/fine_tuning/jobs/{job_id}/events/stream")
        missing = http.get("/v1/fine_tuning/jobs/ftjob-000000000000/events/stream")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"]["message"].replace(job_id, "X") == missing.json()["error"]["message"].replace(
        "ftjob-000000000000", "X"
    )
    with gw.gateway.http(authorized=False) as http:
        assert http.get(f"/v1/fine_tuning/jobs/{job_id}/events/stream").status_code == 401
    assert gw.trainer.watching == 0  # nothing was started for the refused calls
