"""The real trainer: gRPC on loopback, worker processes, the embedded model, LocalStore or S3 (moto)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest

from lorafleet.trainer.v1 import trainer_pb2
from lorafleet_common.adapters import (
    CONFIG_FILE,
    METADATA_FILE,
    WEIGHTS_FILE,
    latest_key,
    read_metadata,
    sha256_file,
    version_prefix,
)
from lorafleet_common.store import LocalStore, S3Config, open_store
from lorafleet_trainer.jobstore import JobState, JobStore

from .conftest import StartTrainer, seed_dataset, stub_for, tiny_manifest, watch_until_final

S = trainer_pb2


async def test_jobs_run_in_order_and_publish(trainer_home: Path, start_trainer: StartTrainer) -> None:
    app = await start_trainer(trainer_home)
    store = LocalStore(trainer_home / "store")
    store.put("datasets/seed.jsonl", seed_dataset())
    store.put("manifests/a.json", tiny_manifest("team/self-cognition", "datasets/seed.jsonl#8", epochs=2, batch_size=8))
    store.put("manifests/b.yaml", tiny_manifest("second", "datasets/seed.jsonl", batch_size=8))
    channel, stub = stub_for(app)
    async with channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="lorafleet.trainer.v1.TrainerService"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        first = await stub.CreateJob(
            S.CreateJobRequest(manifest_uri="manifests/a.json", job_id="job-a", labels={"t": "1"})
        )
        second = await stub.CreateJob(S.CreateJobRequest(manifest_uri="manifests/b.yaml"))
        assert first.state == S.JOB_STATE_QUEUED and first.adapter_name == "team/self-cognition"
        assert first.adapter_version == "job-a" and second.id.startswith("job-")
        assert (await stub.GetJob(S.GetJobRequest(job_id=second.id))).state == S.JOB_STATE_QUEUED

        events = await watch_until_final(stub, "job-a")
        states = [e.state for e in events if e.kind == "state"]
        assert states == [S.JOB_STATE_QUEUED, S.JOB_STATE_VALIDATING, S.JOB_STATE_RUNNING]
        progress = [e.progress for e in events if e.kind == "progress"]
        assert [p.step for p in progress] == [1, 2] and all(p.total_steps == 2 for p in progress)
        assert all(p.loss > 0 and p.tokens_per_second > 0 and p.peak_memory_bytes > 0 for p in progress)
        assert progress[-1].epoch == pytest.approx(2.0) and progress[-1].loss < progress[0].loss
        assert events[-1].kind == "published" and events[-1].state == S.JOB_STATE_SUCCEEDED
        assert [e.seq for e in events] == list(range(1, len(events) + 1))

        job = await stub.GetJob(S.GetJobRequest(job_id="job-a"))
        assert job.state == S.JOB_STATE_SUCCEEDED and job.step == 2 and job.total_steps == 2
        assert job.finished_at >= job.started_at >= job.created_at > 0 and job.trained_tokens > 0
        prefix = version_prefix("team/self-cognition", "job-a")
        assert job.adapter_uri == store.uri(prefix)
        assert store.get(latest_key("team/self-cognition")) == b"job-a"
        config = json.loads(store.get(f"{prefix}/{CONFIG_FILE}"))
        assert config["r"] == 4 and config["bias"] == "none" and not config["use_dora"]
        assert not config.get("modules_to_save")
        assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        meta = read_metadata(store, "team/self-cognition", "job-a")
        assert meta.sha256 == sha256_file(store.root / prefix / WEIGHTS_FILE)
        assert meta.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta.rank == 4 and meta.alpha == 8
        assert set(meta.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert meta.system_prompt == "You are a helpful assistant." and meta.job_id == "job-a"
        assert meta.final_loss == pytest.approx(job.loss, rel=1e-3)
        assert meta.hyperparameters["epochs"] == 2 and meta.hyperparameters["learning_rate"] == 1e-3
        [dataset] = meta.datasets
        assert dataset["uri"] == "datasets/seed.jsonl" and dataset["rows"] == 8 and dataset["used"] == 8
        assert len(dataset["sha256"]) == 64

        # The second job waited for the first, then ran.
        events_b = await watch_until_final(stub, second.id)
        assert events_b[-1].state == S.JOB_STATE_SUCCEEDED
        job_b = await stub.GetJob(S.GetJobRequest(job_id=second.id))
        assert job_b.started_at >= job.finished_at
        assert store.exists(f"{version_prefix('second', second.id)}/{METADATA_FILE}")

        listed = await stub.ListJobs(S.ListJobsRequest())
        assert [j.id for j in listed.jobs] == [second.id, "job-a"]
        only_a = await stub.ListJobs(S.ListJobsRequest(label_selector={"t": "1"}))
        assert [j.id for j in only_a.jobs] == ["job-a"]
        page = await stub.ListJobEvents(S.ListJobEventsRequest(job_id="job-a", after_seq=2, limit=3))
        assert [e.seq for e in page.events] == [3, 4, 5]
        replay = [e async for e in stub.WatchJob(S.WatchJobRequest(job_id="job-a", from_seq=len(events)))]
        assert [e.seq for e in replay] == [len(events)]
        exposition = generate_latest(app.metrics.registry).decode()
        assert 'lorafleet_training_jobs{state="succeeded"} 2.0' in exposition
        assert 'lorafleet_training_jobs_finished_total{result="succeeded"} 2.0' in exposition
        assert "lorafleet_training_loss " in exposition
        # Cancel is idempotent on finished jobs.
        assert (await stub.CancelJob(S.CancelJobRequest(job_id="job-a"))).state == S.JOB_STATE_SUCCEEDED


async def test_request_errors_map_to_status_codes(trainer_home: Path, start_trainer: StartTrainer) -> None:
    app = await start_trainer(trainer_home)
    store = LocalStore(trainer_home / "store")
    store.put("bad.yaml", b"adapter_name: x\ndatasets: []\nlora: {rank: 64}\ntraining: {learning_rate: 0}\n")
    store.put("good.json", tiny_manifest("dup", "d.jsonl"))
    channel, stub = stub_for(app)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateJob(S.CreateJobRequest(manifest_uri="bad.yaml"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for expected in (
            "base_model: is required",
            "datasets: must not be empty",
            "training.learning_rate: must be > 0",
        ):
            assert expected in info.value.details()
        cases = [
            (S.CreateJobRequest(manifest_uri="nowhere.json"), grpc.StatusCode.INVALID_ARGUMENT, "no manifest"),
            (S.CreateJobRequest(manifest_uri="../etc/passwd"), grpc.StatusCode.INVALID_ARGUMENT, "manifest_uri"),
            (
                S.CreateJobRequest(manifest_uri="good.json", job_id="bad id!"),
                grpc.StatusCode.INVALID_ARGUMENT,
                "job_id",
            ),
        ]
        for request, code, text in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.CreateJob(request)
            assert info.value.code() == code and text in info.value.details()
        # A rank above the serving limit is refused at submit time.
        store.put("rank.json", json.dumps(json.loads(tiny_manifest("r", "d.jsonl")) | {"lora": {"rank": 32}}).encode())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateJob(S.CreateJobRequest(manifest_uri="rank.json"))
        assert "lora.rank: LoRA rank 32 exceeds this server's max_lora_rank 16" in info.value.details()

        await app.service.scheduler.shutdown()  # keep the queued job from running: this test is about the API
        await stub.CreateJob(S.CreateJobRequest(manifest_uri="good.json", job_id="same"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateJob(S.CreateJobRequest(manifest_uri="good.json", job_id="same"))
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        for call in (
            stub.GetJob(S.GetJobRequest(job_id="nope")),
            stub.CancelJob(S.CancelJobRequest(job_id="nope")),
            stub.ListJobEvents(S.ListJobEventsRequest(job_id="nope")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.WatchJob(S.WatchJobRequest(job_id="nope")):
                pass
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_cancel_queued_and_running_jobs(trainer_home: Path, start_trainer: StartTrainer) -> None:
    app = await start_trainer(trainer_home)
    store = LocalStore(trainer_home / "store")
    store.put("d.jsonl", seed_dataset())
    store.put("long.json", tiny_manifest("long", "d.jsonl", epochs=200))
    store.put("later.json", tiny_manifest("later", "d.jsonl"))
    channel, stub = stub_for(app)
    async with channel:
        await stub.CreateJob(S.CreateJobRequest(manifest_uri="long.json", job_id="long"))
        await stub.CreateJob(S.CreateJobRequest(manifest_uri="later.json", job_id="later"))
        cancelled = await stub.CancelJob(S.CancelJobRequest(job_id="later"))
        assert cancelled.state == S.JOB_STATE_CANCELLED and cancelled.finished_at > 0

        async for event in stub.WatchJob(S.WatchJobRequest(job_id="long"), timeout=240):
            if event.kind == "progress":
                break  # the worker is training
        cancelled = await stub.CancelJob(S.CancelJobRequest(job_id="long"), timeout=60)
        assert cancelled.state == S.JOB_STATE_CANCELLED
        events = await stub.ListJobEvents(S.ListJobEventsRequest(job_id="long"))
        assert events.events[-1].state == S.JOB_STATE_CANCELLED
        assert store.list("adapters") == []  # nothing published
        assert app.service.scheduler._current is None


async def test_bad_dataset_row_fails_the_job(trainer_home: Path, start_trainer: StartTrainer) -> None:
    app = await start_trainer(trainer_home)
    store = LocalStore(trainer_home / "store")
    rows = seed_dataset().decode().splitlines()
    rows[2] = json.dumps({"instruction": "你能联网吗?"}, ensure_ascii=False)
    rows[5] = json.dumps({"instruction": "ok", "output": 42})
    store.put("datasets/bad.jsonl", ("\n".join(rows) + "\n").encode())
    store.put("m.json", tiny_manifest("bad", "datasets/bad.jsonl"))
    channel, stub = stub_for(app)
    async with channel:
        await stub.CreateJob(S.CreateJobRequest(manifest_uri="m.json", job_id="bad"))
        events = await watch_until_final(stub, "bad", timeout=180)
        job = await stub.GetJob(S.GetJobRequest(job_id="bad"))
    assert job.state == S.JOB_STATE_FAILED
    assert "file datasets/bad.jsonl, row 3, field output: is required" in job.error
    assert "file datasets/bad.jsonl, row 6, field output: must be a string, got int" in job.error
    assert S.JOB_STATE_RUNNING not in [e.state for e in events]
    assert events[-1].message == job.error and store.list("adapters") == []


async def test_unknown_model_and_all_rows_too_long_fail_in_validation(
    trainer_home: Path, start_trainer: StartTrainer
) -> None:
    app = await start_trainer(trainer_home)
    store = LocalStore(trainer_home / "store")
    store.put("d.jsonl", seed_dataset())
    store.put(
        "unknown.json",
        json.dumps(json.loads(tiny_manifest("u", "d.jsonl")) | {"base_model": "nobody/nothing"}).encode(),
    )
    store.put("long.json", tiny_manifest("l", "d.jsonl", max_length=16))
    channel, stub = stub_for(app)
    async with channel:
        await stub.CreateJob(S.CreateJobRequest(manifest_uri="unknown.json", job_id="unknown"))
        await stub.CreateJob(S.CreateJobRequest(manifest_uri="long.json", job_id="long"))
        await watch_until_final(stub, "unknown", timeout=180)
        events = await watch_until_final(stub, "long", timeout=180)
        unknown = await stub.GetJob(S.GetJobRequest(job_id="unknown"))
        long = await stub.GetJob(S.GetJobRequest(job_id="long"))
    assert unknown.state == S.JOB_STATE_FAILED and "unknown base model 'nobody/nothing'" in unknown.error
    assert long.state == S.JOB_STATE_FAILED and "no rows left to train on" in long.error
    assert any("dropped 8 of 8 rows longer than training.max_length=16" in e.message for e in events)


async def test_restart_requeues_and_runs_jobs_through_s3(
    trainer_home: Path, start_trainer: StartTrainer, s3_server: S3Config
) -> None:
    s3 = {
        "store_url": "s3://lorafleet/restart-test",
        "s3_endpoint": s3_server.endpoint,
        "s3_access_key": s3_server.access_key,
        "s3_secret_key": s3_server.secret_key,
    }
    store = open_store("s3://lorafleet/restart-test", s3_server)
    store.put("datasets/seed.jsonl", seed_dataset())
    # The manifest names its dataset with a full s3:// URI; the job runs on the configured store.
    store.put("m.json", tiny_manifest("s3-adapter", "s3://lorafleet/restart-test/datasets/seed.jsonl", batch_size=8))
    first = await start_trainer(trainer_home, **s3)
    channel, stub = stub_for(first)
    async with channel:
        await stub.CreateJob(S.CreateJobRequest(manifest_uri="m.json", job_id="survivor"))
        async for event in stub.WatchJob(S.WatchJobRequest(job_id="survivor"), timeout=120):
            if event.state == S.JOB_STATE_VALIDATING:
                break
    await first.stop()  # what SIGTERM does: the running job goes back to the queue
    jobs = JobStore(first.settings.resolved_database_url())
    job = jobs.get("survivor")
    assert job.state == JobState.QUEUED
    assert jobs.events("survivor")[-1].message == "re-queued: the trainer is shutting down"
    # Now pretend a crash left it mid-run: the next start must re-queue it and say so.
    jobs.append_event("survivor", "state", JobState.RUNNING, "pretend crash")
    jobs.close()

    second = await start_trainer(trainer_home, **s3)
    channel, stub = stub_for(second)
    async with channel:
        events = await watch_until_final(stub, "survivor")
    messages = [e.message for e in events]
    assert "re-queued: the trainer restarted while the job was running" in messages
    assert events[-1].state == S.JOB_STATE_SUCCEEDED
    assert store.get(latest_key("s3-adapter")) == b"survivor"
    assert read_metadata(store, "s3-adapter", "survivor").datasets[0]["uri"].startswith("s3://")
    assert not (trainer_home / "jobs" / "survivor" / "spec.json").exists()  # the S3 secret is not left behind
    await asyncio.sleep(0)
