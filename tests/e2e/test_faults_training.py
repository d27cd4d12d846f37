"""Faults injected into the training side of the fleet: real processes on loopback (issue 7, faults).

A trainer and a gateway (its tenants and keys in SQLite), both on moto's S3 server; no inference
replica is needed. The object store is stopped while a job checkpoints and publishes, then started
again; the gateway is SIGKILLed and restarted on the same database. Killing the trainer mid-job is
tests/trainer/test_checkpoint_resume.py::test_a_crashed_job_resumes_from_its_checkpoint.

Measured figures are printed (``-s``) for docs/reliability.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from lorafleet_common.adapters import latest_key, read_metadata
from lorafleet_common.settings import EMBEDDED_BASE_MODEL
from tests.conftest import free_port
from tests.e2e.fault_fleet import ADMIN_KEY, RestartableS3, service_home, sigkill_main, start, start_gateway
from tests.service_processes import ServiceProcess, group_left, group_members, grpc_probe
from tests.trainer.conftest import SEED_PAIRS

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

ROWS = 4
EPOCHS = 2  # batch 1: 8 optimizer steps, a checkpoint after each but the last


@dataclass
class TrainingFleet:
    s3: RestartableS3
    trainer_port: int
    gateway_port: int
    gateway_home: Path
    procs: list[ServiceProcess]  # every process started, the restarted gateway included: all stopped at the end
    gateway: ServiceProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def start_gateway(self) -> None:
        """A gateway on the fleet's port and database (again, after a kill)."""
        self.gateway, _ = start_gateway(self.gateway_home, self.s3, [free_port()], self.trainer_port, self.gateway_port)
        self.procs.append(self.gateway)

    def client(self, key: str = ADMIN_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=30)

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, embedded_model_path: Path) -> Iterator[TrainingFleet]:
    root = tmp_path_factory.mktemp("faults-training")
    s3 = RestartableS3()
    trainer_port = free_port()
    procs: list[ServiceProcess] = []
    try:
        trainer = start(
            "trainer",
            service_home(root / "trainer"),
            {
                **s3.env(),
                "LORAFLEET_TRAINER_GRPC_PORT": str(trainer_port),
                "LORAFLEET_TRAINER_METRICS_PORT": "0",
                "LORAFLEET_TRAINER_TORCH_THREADS": "1",
                "LORAFLEET_TRAINER_JOB_POLL_INTERVAL_S": "0.5",
            },
        )
        procs.append(trainer)
        trainer.wait_ready(grpc_probe(trainer_port), 120)
        fleet = TrainingFleet(s3, trainer_port, free_port(), service_home(root / "gateway"), procs)
        fleet.start_gateway()
        yield fleet
    finally:
        for proc in reversed(procs):
            if proc.popen.poll() is None:
                proc.terminate(15)
            proc.kill()
            assert group_left(proc.pid) == [], f"{proc.service} left processes behind"
        s3.stop()


def dataset() -> bytes:
    rows = [{"instruction": q, "output": a} for q, a in SEED_PAIRS[:ROWS]]
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def messages(client: openai.OpenAI, job_id: str) -> list[str]:
    """The job's event messages, oldest first."""
    events = client.fine_tuning.jobs.list_events(job_id, limit=500).data
    return [e.message for e in reversed(events)]


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, interval_s: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval_s)


def create_job(client: openai.OpenAI, file_id: str, **lorafleet: Any) -> Any:
    return client.fine_tuning.jobs.create(
        model=EMBEDDED_BASE_MODEL,
        training_file=file_id,
        hyperparameters={"n_epochs": EPOCHS, "batch_size": 1, "learning_rate_multiplier": 10},
        extra_body={"lorafleet": {"lora": {"rank": 4, "alpha": 8}, **lorafleet}},
    )


def test_store_outage_during_checkpoints_and_publishing(fleet: TrainingFleet) -> None:
    client = fleet.client()
    upload = client.files.create(file=("seed.jsonl", dataset()), purpose="fine-tune")
    job = create_job(client, upload.id, training={"checkpoint_every_steps": 1, "checkpoint_every_minutes": 0})
    wait_for("a checkpoint", lambda: any(m.startswith("checkpoint saved") for m in messages(client, job.id)), 180)
    fleet.s3.stop()
    stopped = time.monotonic()
    try:

        def three_retries_or_the_end() -> list[str] | bool:
            """Three publish attempts failed (1 + 2 + 4 s of backoff with the store down), or the job ended."""
            retries = [m for m in messages(client, job.id) if "retrying" in m]
            return retries if len(retries) >= 3 else client.fine_tuning.jobs.retrieve(job.id).status != "running"

        retrying = wait_for("publish retries", three_retries_or_the_end, 180)
        status = client.fine_tuning.jobs.retrieve(job.id).status
        assert status == "running", f"the job ended with the store down: {status}: {messages(client, job.id)[-5:]}"
        print(f"\nstore down {time.monotonic() - stopped:.1f} s; the worker says: {retrying[-1]}")
    finally:
        fleet.s3.start()
    outage = time.monotonic() - stopped
    restarted = time.monotonic()
    done = wait_for(
        "the job to end",
        lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("failed", "succeeded", "cancelled") and j,
        120,
    )
    published_after = time.monotonic() - restarted
    log = messages(client, job.id)
    assert done.status == "succeeded", (done.error, log[-8:])
    lost = [m for m in log if "could not be saved" in m]
    retries = [m for m in log if "retrying" in m]
    saved = [m for m in log if m.startswith("checkpoint saved")]
    print(
        f"store down {outage:.1f} s: {len(saved)} checkpoints saved, {len(lost)} not saved (warnings), "
        f"{len(retries)} publish retries; published {published_after:.1f} s after the store came back"
    )
    assert lost and all(m.startswith("warning: the checkpoint at step") for m in lost)
    assert len(saved) + len(lost) == ROWS * EPOCHS - 1  # every step but the last checkpoints, saved or not

    # Nothing lost: the adapter of the whole run is published, and the job's checkpoints are gone.
    store = fleet.s3.store
    name = f"default/{done.fine_tuned_model}"
    assert store.get(latest_key(name)).decode() == job.id
    metadata = read_metadata(store, name, job.id)
    assert metadata.final_loss is not None and metadata.training_rows == ROWS
    # The checkpoints are deleted just after the final event is recorded: a watcher can see "succeeded" first.
    wait_for("the checkpoints' deletion", lambda: store.list(f"checkpoints/{job.id}") == [], 30)
    assert done.fine_tuned_model in {m.id for m in client.models.list().data}


def test_gateway_sigkill_loses_no_tenant_key_file_or_job(fleet: TrainingFleet) -> None:
    with fleet.admin() as admin:
        assert admin.post("/v1/admin/tenants", json={"id": "acme", "name": "Acme"}).status_code == 201
        created = admin.post("/v1/admin/tenants/acme/keys", json={"name": "ci"}).json()
    key = created["key"]
    acme = fleet.client(key)
    data = dataset()
    upload = acme.files.create(file=("acme.jsonl", data), purpose="fine-tune")
    job = create_job(acme, upload.id)
    before = {
        "models": sorted(m.id for m in fleet.client().models.list().data),
        "admin_jobs": sorted(j.id for j in fleet.client().fine_tuning.jobs.list().data),
    }

    assert fleet.gateway is not None
    sigkill_main(fleet.gateway)
    assert group_members(fleet.gateway.pid) == []
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{fleet.url}/health", timeout=2)
    started = time.monotonic()
    fleet.start_gateway()
    print(
        f"\ngateway SIGKILLed and restarted on the same database: serving again in {time.monotonic() - started:.1f} s"
    )

    # The old key works; the tenant's file and job are there, as before.
    assert [f.id for f in acme.files.list().data] == [upload.id]
    assert acme.files.content(upload.id).read() == data
    restored = acme.fine_tuning.jobs.retrieve(job.id)
    assert restored.training_file == upload.id and restored.status in ("queued", "validating_files", "running")
    assert [j.id for j in acme.fine_tuning.jobs.list().data] == [job.id]
    with fleet.admin() as admin:
        tenants = {t["id"] for t in admin.get("/v1/admin/tenants").json()["data"]}
        keys = admin.get("/v1/admin/tenants/acme/keys").json()["data"]
    assert "acme" in tenants and [k["id"] for k in keys] == [created["id"]]
    after = {
        "models": sorted(m.id for m in fleet.client().models.list().data),
        "admin_jobs": sorted(j.id for j in fleet.client().fine_tuning.jobs.list().data),
    }
    assert after == before
    assert acme.fine_tuning.jobs.cancel(job.id).status == "cancelled"
