"""The Job and Secret the trainer's Kubernetes launcher creates, checked like the chart's manifests.

Strict Kubernetes schemas (unknown fields fail) on the chart's oldest and newest Kubernetes, the
chart's pod rules (non-root, read-only root), and a round trip through the ``kubernetes`` client's
models: the client drops a field its model does not know, silently, so a misspelt one would never
reach the cluster.
"""

from __future__ import annotations

import base64
import copy
import json
from types import ModuleType
from typing import Any

import pytest

from lorafleet_trainer.k8s_objects import MAX_NAME, build_job, job_label_value, new_job_name
from lorafleet_trainer.protocol import S3Settings, WorkerSpec
from lorafleet_trainer.settings import TrainerSettings
from tests.deploy.manifest_checks import Rendered, reference_problems
from tests.deploy.test_helm_chart import KUBERNETES_VERSIONS

EVERY_OPTION: dict[str, Any] = {
    "launcher": "kubernetes",
    "k8s_image": "registry.example.com/lorafleet/trainer:0.1.0",
    "k8s_image_pull_policy": "Always",
    "k8s_image_pull_secrets": ["regcred"],
    "k8s_service_account": "trainer-jobs",
    "k8s_name_prefix": "demo-lorafleet",
    "k8s_labels": {"app.kubernetes.io/name": "lorafleet", "app.kubernetes.io/component": "trainer-job"},
    "k8s_node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "k8s_tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "k8s_resources": {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "96Gi"}},
    "k8s_env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}}],
    "k8s_model_cache_claim": "lorafleet-models",
    "k8s_active_deadline_s": 86400,
}


def spec(job_id: str = "ftjob-0123abcd", devices: int = 2) -> WorkerSpec:
    manifest = {"base_model": "Qwen/Qwen2.5-7B-Instruct", "adapter_name": "a", "datasets": ["d.jsonl"]}
    return WorkerSpec(
        job_id=job_id,
        manifest=manifest | {"resources": {"devices": devices}},
        store_url="s3://lorafleet",
        s3=S3Settings(
            endpoint="minio:9000", access_key="k", secret_key="s3-secret", secure=False, region=None, timeout_s=30
        ),
        model_cache_dir="/var/lib/lorafleet/models",
    )


@pytest.fixture(params=["every-option", "minimal-cpu"])
def objects(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    fields = EVERY_OPTION if request.param == "every-option" else {
        "launcher": "kubernetes", "k8s_image": "lorafleet/trainer:0.1.0-cpu", "k8s_gpu_resource": ""
    }  # fmt: skip
    settings = TrainerSettings(home=tmp_path, **fields)
    built = build_job(settings, "fleet", spec(devices=2 if request.param == "every-option" else 1))
    return built.job, built.secret(spec(), "0b7f3c1e-8d4a-4c6e-9f1a-2b3c4d5e6f70")


def test_job_and_secret_validate_against_kubernetes(
    objects: tuple[dict[str, Any], dict[str, Any]], k8s_validate: ModuleType
) -> None:
    for manifest in objects:
        for version in KUBERNETES_VERSIONS:
            try:
                k8s_validate.validate(manifest, version, strict=True)
            except k8s_validate.ValidationError as exc:
                path = "/".join(str(p) for p in exc.path)
                pytest.fail(f"{manifest['kind']} invalid on {version} at {path}: {exc.message}")


def test_the_client_models_keep_every_field(objects: tuple[dict[str, Any], dict[str, Any]]) -> None:
    from kubernetes import client

    api = client.ApiClient()
    job, secret = objects
    assert api.sanitize_for_serialization(client.V1Job.from_dict(job)) == job
    assert api.sanitize_for_serialization(client.V1Secret.from_dict(secret)) == secret


def test_job_pod_follows_the_chart_rules(objects: tuple[dict[str, Any], dict[str, Any]]) -> None:
    job, secret = objects
    # What the operator provides (the chart, when it renders them): the pods' ServiceAccount and model claim.
    provided = [{"kind": "ServiceAccount", "metadata": {"name": "trainer-jobs"}}]
    provided += [{"kind": "PersistentVolumeClaim", "metadata": {"name": "lorafleet-models"}}]
    docs = [Rendered("launch_k8s", job), Rendered("launch_k8s", secret), *(Rendered("given", d) for d in provided)]
    assert reference_problems(docs, external_secrets={"hf-token"}) == []
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert job["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    assert job["spec"]["template"]["metadata"]["labels"] == job["metadata"]["labels"]


def test_every_option_reaches_the_pod(objects: tuple[dict[str, Any], dict[str, Any]]) -> None:
    job, secret = objects
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    if container["image"].endswith("-cpu"):  # the minimal CPU one: no GPU asked, no optional field set
        assert "nvidia.com/gpu" not in json.dumps(job) and container["resources"] == {}
        assert not {"nodeSelector", "tolerations", "serviceAccountName", "imagePullSecrets"} & set(pod)
        assert "activeDeadlineSeconds" not in job["spec"]
        assert container["command"] == ["python", "-m", "lorafleet_trainer.worker", "/var/lib/lorafleet"]
        return
    assert container["resources"]["limits"] == {"memory": "96Gi", "nvidia.com/gpu": "2"}  # resources.devices: 2
    assert container["command"][:3] == ["python", "-m", "torch.distributed.run"]  # several devices: torchrun
    assert "--nproc-per-node=2" in container["command"]
    assert pod["nodeSelector"] == EVERY_OPTION["k8s_node_selector"]
    assert pod["tolerations"] == EVERY_OPTION["k8s_tolerations"]
    assert pod["serviceAccountName"] == "trainer-jobs" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert job["spec"]["activeDeadlineSeconds"] == 86400 and container["imagePullPolicy"] == "Always"
    assert EVERY_OPTION["k8s_env"][0] in container["env"]
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "trainer-job"
    decoded = json.loads(base64.b64decode(secret["data"]["spec.json"]))
    assert decoded["s3"]["secret_key"] == "s3-secret" and secret["immutable"] is True


def test_names_and_labels_are_valid_for_any_job_id() -> None:
    for job_id in ["a", "Job_With_UNDERSCORES-", "x" * 64, "9-9-9"]:
        name = new_job_name("a" * 40, job_id)
        assert len(name) <= MAX_NAME and name[0].isalnum() and name[-1].isalnum()
        assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
        label = job_label_value(job_id)
        assert len(label) <= 63 and label[0].isalnum() and label[-1].isalnum()
    assert new_job_name("p", "same") != new_job_name("p", "same")  # one per launch
    assert job_label_value("Job") != job_label_value("job")  # exact ids, never merged


def test_strict_validation_catches_a_misspelt_field(k8s_validate: ModuleType, tmp_path: Any) -> None:
    settings = TrainerSettings(home=tmp_path, launcher="kubernetes", k8s_image="i")
    job = copy.deepcopy(build_job(settings, "fleet", spec()).job)
    job["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(k8s_validate.ValidationError):
        k8s_validate.validate(job, KUBERNETES_VERSIONS[0], strict=True)
