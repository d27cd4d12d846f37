"""The trainer's job store on SQLite and on a real PostgreSQL server: the same behaviour on both, trainers
sharing one PostgreSQL database never claim a job twice, and a real trainer runs, survives a restart and
recovers its jobs there."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorafleet.trainer.v1 import trainer_pb2
from lorafleet_common.adapters import METADATA_FILE, version_prefix
from lorafleet_common.store import LocalStore
from lorafleet_trainer.errors import JobAlreadyExists, JobNotFound
from lorafleet_trainer.jobstore import JobRecord, JobState, JobStore
from lorafleet_trainer.manifest import parse_manifest
from tests.postgres import PostgresServer

from .conftest import StartTrainer, seed_dataset, stub_for, tiny_manifest, watch_until_final

_databases = iter(range(1_000_000))


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    """A fresh database per test on the session's server."""
    return postgres_server.database(f"trainer_{next(_databases)}")


@pytest.fixture(params=["sqlite", "postgresql"])
def job_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    sqlite = f"sqlite:///{tmp_path / 'trainer.db'}"
    url = sqlite if request.param == "sqlite" else request.getfixturevalue("pg_url")
    store = JobStore(url, timeout_s=10)
    store.create_schema()
    yield store
    store.close()


def job(job_id: str, created_at: float, **labels: str) -> JobRecord:
    return JobRecord(
        id=job_id,
        state=JobState.QUEUED,
        manifest_uri=f"s3://lorafleet/manifests/{job_id}.json",
        manifest={"adapter_name": "自我认知", "datasets": ["a.jsonl#500"], "nested": {"rank": 8, "ratio": 0.5}},
        adapter_name="self-cognition",
        base_model="Qwen/Qwen2.5-7B-Instruct",
        labels=labels,
        created_at=created_at,
    )


def test_the_store_behaves_alike_on_both_databases(job_store: JobStore) -> None:
    now = time.time()
    job_store.insert(job("j1", now, tenant="t1"), "queued")
    job_store.insert(job("j2", now + 1, tenant="t2"), "queued")
    with pytest.raises(JobAlreadyExists):
        job_store.insert(job("j1", now + 2), "again")
    with pytest.raises(JobNotFound):
        job_store.append_event("nope", "log", JobState.QUEUED, "x")

    stored = job_store.get("j1")
    assert stored.manifest["nested"] == {"rank": 8, "ratio": 0.5} and stored.manifest["adapter_name"] == "自我认知"
    assert stored.labels == {"tenant": "t1"}
    assert [j.id for j in job_store.in_states(JobState.QUEUED)] == ["j1", "j2"]  # queue order: oldest first
    assert [j.id for j in job_store.list_jobs(10)] == ["j2", "j1"]  # listings: newest first
    assert [j.id for j in job_store.list_jobs(10, {"tenant": "t2"})] == ["j2"]

    claimed = job_store.append_event("j1", "state", JobState.VALIDATING, "validating", only_from=(JobState.QUEUED,))
    assert claimed is not None and claimed.seq == 2
    assert job_store.append_event("j1", "state", JobState.VALIDATING, "twice", only_from=(JobState.QUEUED,)) is None
    progress = {"step": 3.0, "loss": 1.25, "eval_loss": 1.5}
    job_store.append_event("j1", "progress", JobState.RUNNING, "step 3", progress=progress, step=3, loss=1.25)
    # A NUL from a bad dataset line quoted in an error: PostgreSQL text cannot hold it; the message survives.
    failed = job_store.append_event(
        "j1", "state", JobState.FAILED, "row 7: bad byte \x00 here", error="row 7: bad byte \x00 here"
    )
    assert failed is not None

    events = job_store.events("j1")
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert events[2].progress == progress
    assert events[3].message == "row 7: bad byte \ufffd here"
    assert [e.seq for e in job_store.events("j1", after_seq=2, limit=1)] == [3]
    final = job_store.get("j1")
    assert (final.state, final.step, final.loss, final.error) == (
        JobState.FAILED,
        3,
        1.25,
        "row 7: bad byte \ufffd here",
    )
    counts = job_store.count_by_state()
    assert counts[JobState.FAILED] == 1 and counts[JobState.QUEUED] == 1 and counts[JobState.RUNNING] == 0


def test_trainers_sharing_postgresql_claim_a_job_once_and_number_events_without_gaps(pg_url: str) -> None:
    """Two stores are two trainer processes (their own engines and locks); only row locks keep them apart."""
    stores = [JobStore(pg_url, timeout_s=10) for _ in range(2)]
    stores[0].create_schema()
    try:
        for n in range(5):
            stores[0].insert(job(f"race-{n}", time.time() + n), "queued")
        barrier = threading.Barrier(8)
        claims: list[str] = []
        lock = threading.Lock()

        def contend(store: JobStore) -> None:
            for n in range(5):
                barrier.wait(timeout=30)
                won = store.append_event(
                    f"race-{n}", "state", JobState.VALIDATING, "claimed", only_from=(JobState.QUEUED,)
                )
                if won is not None:
                    with lock:
                        claims.append(f"race-{n}")
                for i in range(5):  # then everyone logs onto the same job at once
                    store.append_event(f"race-{n}", "log", JobState.VALIDATING, f"line {i}")

        threads = [threading.Thread(target=contend, args=(stores[i % 2],)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        assert sorted(claims) == [f"race-{n}" for n in range(5)]  # each job claimed exactly once
        for n in range(5):
            seqs = [e.seq for e in stores[1].events(f"race-{n}")]
            assert seqs == list(range(1, 2 + 1 + 8 * 5))  # queued + 1 claim + 40 log lines, no gap, no repeat
    finally:
        for store in stores:
            store.close()


async def test_a_trainer_on_postgresql_trains_restarts_and_recovers(
    pg_url: str, trainer_home: Path, start_trainer: StartTrainer
) -> None:
    store = LocalStore(trainer_home / "store")
    store.put("datasets/seed.jsonl", seed_dataset())
    store.put("manifests/pg.json", tiny_manifest("pg-adapter", "datasets/seed.jsonl"))
    app = await start_trainer(trainer_home, database_url=pg_url)
    channel, stub = stub_for(app)
    async with channel:
        job_id = (await stub.CreateJob(trainer_pb2.CreateJobRequest(manifest_uri="manifests/pg.json"), timeout=30)).id
        events = await watch_until_final(stub, job_id)
    assert events[-1].state == trainer_pb2.JOB_STATE_SUCCEEDED, events[-1]
    await app.stop()

    # A job a crashed trainer left RUNNING in the shared database: the next trainer re-queues and runs it.
    orphans = JobStore(pg_url, timeout_s=10)
    try:
        orphan = job("orphan-1", time.time())
        manifest = parse_manifest(tiny_manifest("pg-orphan", "datasets/seed.jsonl"), max_lora_rank=16)
        orphan.manifest = manifest.model_dump(mode="json")
        orphan.manifest_uri, orphan.adapter_name = "manifests/pg.json", "pg-orphan"
        orphans.insert(orphan, "queued")
        orphans.append_event("orphan-1", "state", JobState.RUNNING, "running", step=2)
    finally:
        orphans.close()

    app = await start_trainer(trainer_home, database_url=pg_url)
    channel, stub = stub_for(app)
    async with channel:
        kept = await stub.GetJob(trainer_pb2.GetJobRequest(job_id=job_id), timeout=10)
        assert kept.state == trainer_pb2.JOB_STATE_SUCCEEDED and kept.adapter_uri
        replayed = [e async for e in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id), timeout=30)]
        assert [e.seq for e in replayed] == [e.seq for e in events]
        recovered = await watch_until_final(stub, "orphan-1")
    messages = [e.message for e in recovered]
    assert any("re-queued: the trainer restarted" in m for m in messages), messages
    assert recovered[-1].state == trainer_pb2.JOB_STATE_SUCCEEDED, recovered[-1]
    assert store.exists(f"{version_prefix('pg-orphan', 'orphan-1')}/{METADATA_FILE}")
