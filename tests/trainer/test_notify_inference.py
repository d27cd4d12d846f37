"""On success the trainer asks the inference replicas to load the adapter: real trainer, real gRPC replica stand-in."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lorafleet.trainer.v1 import trainer_pb2
from lorafleet_common.store import LocalStore
from lorafleet_trainer.settings import TrainerSettings
from tests.gateway.gateway_fakes import FakeInference, serve_inference

from .conftest import StartTrainer, seed_dataset, stub_for, tiny_manifest, watch_until_final


async def test_a_published_adapter_is_preloaded_and_a_dead_replica_only_warns(
    trainer_home: Path, start_trainer: StartTrainer, unused_port: Callable[[], int]
) -> None:
    replica = FakeInference("replica-0")
    server = await serve_inference(replica)
    live, dead = f"127.0.0.1:{replica.port}", f"127.0.0.1:{unused_port()}"  # nothing listens on the second
    try:
        app = await start_trainer(trainer_home, torch_threads=1, notify_inference=[live, dead], notify_timeout_s=5.0)
        store = LocalStore(trainer_home / "store")
        store.put("datasets/seed.jsonl", seed_dataset())
        store.put("manifests/a.json", tiny_manifest("team/told", "datasets/seed.jsonl", batch_size=8))
        channel, stub = stub_for(app)
        async with channel:
            await stub.CreateJob(trainer_pb2.CreateJobRequest(manifest_uri="manifests/a.json", job_id="job-told"))
            events = await watch_until_final(stub, "job-told")
            assert events[-1].kind == "published" and events[-1].state == trainer_pb2.JOB_STATE_SUCCEEDED
            deadline = time.monotonic() + 60
            while True:  # the replicas are told after the published event
                reply = await stub.ListJobEvents(trainer_pb2.ListJobEventsRequest(job_id="job-told"))
                notes = [e for e in reply.events if e.seq > events[-1].seq]
                if len(notes) >= 2 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            job = await stub.GetJob(trainer_pb2.GetJobRequest(job_id="job-told"))
    finally:
        await server.stop(None)
    assert replica.loaded == {"team/told@job-told"}
    assert job.state == trainer_pb2.JOB_STATE_SUCCEEDED
    assert all(e.kind == "log" and e.state == trainer_pb2.JOB_STATE_SUCCEEDED for e in notes)
    messages = sorted(e.message for e in notes)
    assert messages[0] == f"preloaded on {live}"
    assert messages[1].startswith(f"warning: team/told@job-told could not be preloaded on {dead}: UNAVAILABLE")


def test_notify_targets_come_from_a_comma_separated_env_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_TRAINER_NOTIFY_INFERENCE", "127.0.0.1:50051, dns:///inference:50051")
    assert TrainerSettings().notify_inference == ["127.0.0.1:50051", "dns:///inference:50051"]
    monkeypatch.setenv("LORAFLEET_TRAINER_NOTIFY_INFERENCE", "inference")
    with pytest.raises(ValueError, match='must be "host:port"'):
        TrainerSettings()
