"""The trainer with ``launcher=kubernetes``: the real ``kubernetes`` client against a Kubernetes API on loopback.

There is no cluster here, so tests/trainer/fake_kubernetes.py stands in for the API server and a
kubelet: it keeps the Jobs, Secrets and pods the launcher creates, rejects a Job the strict schema
rejects, and runs each pod's command as a local process whose output is the pod's log. Everything
else is real: the trainer's gRPC server, its scheduler, the worker training the embedded model.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lorafleet.trainer.v1 import trainer_pb2
from lorafleet_common.adapters import latest_key, read_metadata
from lorafleet_common.store import LocalStore, S3Config, open_store
from lorafleet_trainer.jobstore import JobState, JobStore
from lorafleet_trainer.k8s_api import RBAC_RULES, KubernetesApi, connect
from lorafleet_trainer.launch_k8s import KubernetesLauncher, split_stamp
from lorafleet_trainer.protocol import WorkerSpec
from lorafleet_trainer.settings import TrainerSettings

from .conftest import StartTrainer, seed_dataset, stub_for, tiny_manifest, watch_until_final
from .fake_kubernetes import FakeKubernetes

S = trainer_pb2
NAMESPACE = "training"
IMAGE = "registry.example.com/lorafleet/trainer:0.1.0-cpu"
MODEL_CLAIM = "lorafleet-models"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def cluster(tmp_path: Path, model_cache_dir: Path, embedded_model_path: Path) -> Iterator[FakeKubernetes]:
    try:
        import kubernetes_validate
    except ImportError:  # the fake then accepts any Job; tests/deploy checks the schema on its own
        kubernetes_validate = None
    # The model cache claim is the suite's shared cache: the embedded model is not converted again per pod.
    fake = FakeKubernetes(tmp_path / "kubelet", {MODEL_CLAIM: model_cache_dir}, kubernetes_validate).start()
    yield fake
    fake.stop()


def k8s_fields(cluster: FakeKubernetes, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """Trainer settings for the fake cluster, as the Helm chart would set them."""
    return {
        "launcher": "kubernetes",
        "k8s_config": "kubeconfig",
        "k8s_kubeconfig": cluster.kubeconfig(tmp_path / "kubeconfig", NAMESPACE),
        "k8s_image": IMAGE,
        "k8s_image_pull_policy": "IfNotPresent",
        "k8s_name_prefix": "demo-lorafleet",
        "k8s_labels": {"app.kubernetes.io/component": "trainer-job"},
        "k8s_resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "6Gi"}},
        "k8s_model_cache_claim": MODEL_CLAIM,
        "k8s_env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
        "k8s_start_timeout_s": 60.0,
    } | extra


async def until_the_worker_speaks(stub: Any, job_id: str) -> None:
    async for event in stub.WatchJob(S.WatchJobRequest(job_id=job_id), timeout=120):
        if event.kind == "log":
            return  # the first line of the worker in the pod: it runs and its log is followed
    pytest.fail(f"job {job_id} ended before its worker said anything")


async def until_running(stub: Any, job_id: str) -> None:
    async for event in stub.WatchJob(S.WatchJobRequest(job_id=job_id), timeout=120):
        if event.state == S.JOB_STATE_RUNNING:
            return  # the worker in the pod has read its data and starts training
    pytest.fail(f"job {job_id} ended before it ran")


async def no_pod_left(cluster: FakeKubernetes, timeout: float = 60) -> None:
    """The trainer deleted every Job and Secret it made, and no pod process runs (a job is final in the
    database as soon as the worker reports it; the trainer cleans up once the pod has exited)."""
    deadline = time.monotonic() + timeout
    while (
        cluster.jobs or cluster.secrets or any(p.process is not None and p.done is False for p in cluster.pods.values())
    ):
        assert time.monotonic() < deadline, (cluster.jobs.keys(), cluster.secrets.keys(), cluster.pods.keys())
        await asyncio.sleep(0.2)
    assert not [p for p in cluster.pods.values() if p.process is not None and p.process.poll() is None]
    granted = {(group, resource, verb) for group, resource, verbs in RBAC_RULES for verb in verbs}
    assert cluster.used_rights() <= granted  # the launcher needs no right the chart's Role (RBAC_RULES) lacks


async def test_a_job_runs_as_a_kubernetes_job_and_publishes(
    trainer_home: Path, start_trainer: StartTrainer, cluster: FakeKubernetes, s3_server: S3Config, tmp_path: Path
) -> None:
    s3 = {
        "store_url": "s3://lorafleet/k8s-test",
        "s3_endpoint": s3_server.endpoint,
        "s3_access_key": s3_server.access_key,
        "s3_secret_key": s3_server.secret_key,
    }
    store = open_store("s3://lorafleet/k8s-test", s3_server)
    store.put("datasets/seed.jsonl", seed_dataset())
    store.put("m.json", tiny_manifest("k8s-adapter", "datasets/seed.jsonl#4", epochs=2))
    cluster.drop_log_after_lines = 3  # the first log stream breaks: the launcher must re-open it, losing nothing
    app = await start_trainer(trainer_home, **s3, **k8s_fields(cluster, tmp_path))
    channel, stub = stub_for(app)
    async with channel:
        await stub.CreateJob(S.CreateJobRequest(manifest_uri="m.json", job_id="k8s_Job-1"))
        events = await watch_until_final(stub, "k8s_Job-1", timeout=240)
        job = await stub.GetJob(S.GetJobRequest(job_id="k8s_Job-1"))
    assert job.state == S.JOB_STATE_SUCCEEDED, job.error
    assert store.get(latest_key("k8s-adapter")) == b"k8s_Job-1"
    assert read_metadata(store, "k8s-adapter", "k8s_Job-1").rank == 4
    # Every event once, in order, although the log stream broke after 3 lines and was read again.
    assert [e.state for e in events if e.kind == "state"] == [
        S.JOB_STATE_QUEUED,
        S.JOB_STATE_VALIDATING,
        S.JOB_STATE_RUNNING,
    ]
    assert [e.progress.step for e in events if e.kind == "progress"] == [1, 2]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    logs = [q for m, p, q, _ in cluster.requests if m == "GET" and p.endswith("/log")]
    assert len(logs) >= 2 and "sinceSeconds" not in logs[0] and "sinceSeconds" in logs[1]
    assert all(q["follow"] == ["true"] and q["timestamps"] == ["true"] for q in logs)

    (body,) = cluster.created_jobs
    name = body["metadata"]["name"]
    assert name.startswith("demo-lorafleet-k8s-job-1-") and len(name) <= 63
    assert body["metadata"]["annotations"]["lorafleet.io/job-id"] == "k8s_Job-1"
    assert body["spec"]["backoffLimit"] == 0 and body["spec"]["ttlSecondsAfterFinished"] == 3600
    pod = body["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["terminationGracePeriodSeconds"] == 3  # the trainer's cancel grace (3 s in these tests)
    assert body["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "trainer-job"
    (container,) = pod["containers"]
    assert container["image"] == IMAGE and container["imagePullPolicy"] == "IfNotPresent"
    assert container["command"] == ["python", "-m", "lorafleet_trainer.worker", "/var/lib/lorafleet"]
    assert container["resources"] == {
        "requests": {"cpu": "1", "memory": "2Gi"},
        "limits": {"memory": "6Gi", "nvidia.com/gpu": "1"},  # one per device of the manifest (default 1)
    }
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LORAFLEET_WORKER_SPEC_FILE"] == "/etc/lorafleet/job/spec.json" and env["HF_HUB_OFFLINE"] == "1"
    assert {"name": "spec", "mountPath": "/etc/lorafleet/job", "readOnly": True} in container["volumeMounts"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["spec"]["secret"] == {"secretName": name, "defaultMode": 0o440}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": MODEL_CLAIM}

    (secret,) = [b for m, p, _, b in cluster.requests if m == "POST" and p.endswith("/secrets")]
    assert secret["metadata"]["ownerReferences"][0]["uid"] == cluster.created_jobs[0]["metadata"]["uid"]
    spec = WorkerSpec.model_validate_json(base64.b64decode(secret["data"]["spec.json"]))
    assert spec.s3.secret_key == s3_server.secret_key and spec.model_cache_dir == "/var/lib/lorafleet/models"
    await no_pod_left(cluster)
    (finished,) = cluster.finished
    assert finished.spec_file_intact is True  # the worker read the mounted spec and left it alone
    assert finished.container_state["terminated"]["exitCode"] == 0
    worker_log = (app.settings.resolved_work_dir() / "k8s_Job-1" / "worker.log").read_text()
    assert "reading 1 dataset(s)" not in worker_log  # events are not log lines


async def test_cancel_deletes_the_job_with_the_grace_period(
    trainer_home: Path, start_trainer: StartTrainer, cluster: FakeKubernetes, tmp_path: Path
) -> None:
    store = LocalStore(trainer_home / "store")
    store.put("d.jsonl", seed_dataset())
    store.put("long.json", tiny_manifest("long", "d.jsonl", epochs=200))
    app = await start_trainer(trainer_home, **k8s_fields(cluster, tmp_path))
    channel, stub = stub_for(app)
    async with channel:
        await stub.CreateJob(S.CreateJobRequest(manifest_uri="long.json", job_id="long"))
        await until_running(stub, "long")
        started = time.monotonic()
        cancelled = await stub.CancelJob(S.CancelJobRequest(job_id="long"), timeout=60)
        elapsed = time.monotonic() - started
    assert cancelled.state == S.JOB_STATE_CANCELLED and elapsed < 15
    await no_pod_left(cluster)
    pod_deletes = [q for _, q in cluster.deletes("pods")]
    assert pod_deletes[0]["gracePeriodSeconds"] == ["3"]  # SIGTERM first, with the cancel grace
    assert cluster.deletes("jobs")[0][1]["propagationPolicy"] == ["Background"]
    (finished,) = cluster.finished
    assert finished.container_state["terminated"]["exitCode"] == 143  # it stopped on SIGTERM, not SIGKILL
    assert LocalStore(trainer_home / "store").list("adapters") == []


UNPULLABLE = "registry.invalid/lorafleet/trainer:missing"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"k8s_image": UNPULLABLE}, f'ImagePullBackOff: Back-off pulling image "{UNPULLABLE}"'),
        ({"k8s_model_cache_claim": "no-such-claim"}, 'Unschedulable: persistentvolumeclaim "no-such-claim" not found'),
    ],
    ids=["image-pull-backoff", "unschedulable"],
)
async def test_a_pod_that_never_starts_fails_the_job_with_its_reason(
    trainer_home: Path,
    start_trainer: StartTrainer,
    cluster: FakeKubernetes,
    tmp_path: Path,
    fields: dict[str, Any],
    reason: str,
) -> None:
    store = LocalStore(trainer_home / "store")
    store.put("d.jsonl", seed_dataset())
    store.put("m.json", tiny_manifest("never", "d.jsonl"))
    app = await start_trainer(trainer_home, **k8s_fields(cluster, tmp_path, k8s_start_timeout_s=2.0, **fields))
    channel, stub = stub_for(app)
    async with channel:
        await stub.CreateJob(S.CreateJobRequest(manifest_uri="m.json", job_id="never"))
        await watch_until_final(stub, "never", timeout=60)
        job = await stub.GetJob(S.GetJobRequest(job_id="never"))
    assert job.state == S.JOB_STATE_FAILED
    assert job.error == f"the job's Kubernetes pod did not start within 2 s: {reason}"
    await no_pod_left(cluster)


async def test_trainer_shutdown_requeues_the_job_in_its_pod(
    trainer_home: Path, start_trainer: StartTrainer, cluster: FakeKubernetes, tmp_path: Path
) -> None:
    store = LocalStore(trainer_home / "store")
    store.put("d.jsonl", seed_dataset())
    store.put("long.json", tiny_manifest("long", "d.jsonl", epochs=200))
    app = await start_trainer(trainer_home, **k8s_fields(cluster, tmp_path))
    channel, stub = stub_for(app)
    async with channel:
        await stub.CreateJob(S.CreateJobRequest(manifest_uri="long.json", job_id="survivor"))
        await until_the_worker_speaks(stub, "survivor")
    await app.stop()  # what SIGTERM to the trainer's pod does
    await no_pod_left(cluster)
    jobs = JobStore(app.settings.resolved_database_url())
    try:
        assert jobs.get("survivor").state == JobState.QUEUED
        assert jobs.events("survivor")[-1].message == "re-queued: the trainer is shutting down"
    finally:
        jobs.close()
    (finished,) = cluster.finished
    assert finished.container_state["terminated"]["exitCode"] == 143


async def test_a_relaunch_removes_the_job_a_crashed_trainer_left(cluster: FakeKubernetes, tmp_path: Path) -> None:
    """A trainer killed mid-job leaves its Job running; the job's next launch stops it before starting anew."""
    fields = k8s_fields(cluster, tmp_path, k8s_image="registry.invalid/never:pulled", k8s_start_timeout_s=30.0)
    settings = TrainerSettings(home=tmp_path / "home", **fields)
    api_client, namespace = connect(settings)
    assert namespace == NAMESPACE  # from the kubeconfig context
    launcher = KubernetesLauncher(settings, KubernetesApi(api_client, namespace, 10.0))
    spec = WorkerSpec(
        job_id="crashed", manifest=json.loads(tiny_manifest("x", "d.jsonl")), store_url="file:///nowhere",
        s3={"endpoint": "", "access_key": "", "secret_key": "", "secure": False, "region": None, "timeout_s": 1},
        model_cache_dir=str(tmp_path),
    )  # fmt: skip
    orphan = await launcher.launch(spec, tmp_path / "jobs" / "crashed")  # the crashed trainer never closes it
    worker = await launcher.launch(spec, tmp_path / "jobs" / "crashed")
    first, second = (j["metadata"]["name"] for j in cluster.created_jobs)
    assert first != second and set(n for _, n in cluster.jobs) == {second}
    assert [(p, q["gracePeriodSeconds"]) for p, q in cluster.deletes("jobs")] == [
        (f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{first}", ["0"])
    ]
    await worker.signal(signal.SIGKILL)
    assert await asyncio.wait_for(worker.wait(), 10) == -9
    await worker.close()
    await orphan.close()
    await no_pod_left(cluster)


def test_log_timestamps_order_lines_across_formats() -> None:
    early, line = split_stamp(b'2026-11-22T10:00:00.12Z {"kind": "log"}')
    late, _ = split_stamp(b"2026-11-22T10:00:00.123Z x")
    assert line == b'{"kind": "log"}' and early is not None and late is not None and early < late
    assert split_stamp(b"2026-11-22T11:00:00+01:00 y")[0] == (split_stamp(b"2026-11-22T10:00:00Z y")[0])
    assert split_stamp(b"no stamp here") == (None, b"no stamp here")
