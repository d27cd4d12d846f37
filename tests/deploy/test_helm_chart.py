"""helm/lorafleet rendered by Helm's own Go engine, every manifest checked against Kubernetes schemas.

Each value combination is what an operator would install: the defaults (plus the required secrets),
an external S3 with existing Secrets, a cluster without GPUs, the observability and isolation
extras, and several inference replicas. Wrong or missing values must fail at render time with a
message naming the value, never as a crash-looping pod.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest

from lorafleet_trainer.k8s_api import RBAC_RULES
from lorafleet_trainer.k8s_objects import build_job
from lorafleet_trainer.protocol import S3Settings, WorkerSpec
from lorafleet_trainer.settings import TrainerSettings
from tests.deploy.conftest import CHART_DIR, DEPLOY_DIR, Render
from tests.deploy.manifest_checks import SERVICE_MONITOR_SCHEMA, Rendered, pod_specs, reference_problems

# The chart's kubeVersion floor and the version Helm 4.2 assumes offline; strict schemas (unknown fields fail).
KUBERNETES_VERSIONS = ("1.28.0", "1.36.0")

REQUIRED: dict[str, Any] = {
    "auth": {"adminKey": "test-admin-key"},
    "s3": {"accessKey": "fleet", "secretKey": "fleet-secret"},
}


def with_required(extra: dict[str, Any]) -> dict[str, Any]:
    values = copy.deepcopy(REQUIRED)
    for key, sub in extra.items():
        values[key] = {**values.get(key, {}), **sub}
    return values


COMBINATIONS: dict[str, dict[str, Any]] = {
    "defaults": REQUIRED,
    "external-s3": {
        "minio": {"enabled": False},
        "auth": {"existingSecret": "fleet-admin"},
        "s3": {
            "endpoint": "s3.storage.internal:443",
            "secure": True,
            "region": "eu-west-1",
            "bucket": "fleet-prod",
            "prefix": "/lorafleet/",
            "existingSecret": "fleet-s3",
        },
        "trainer": {"databaseUrl": "postgresql+psycopg://fleet:pw@postgres:5432/trainer"},
        "model": {"hfTokenSecret": "hf-token"},
    },
    "cpu": with_required({"gpu": {"enabled": False}, "inference": {"gpuMemoryUtilization": 0.2, "maxModelLen": 2048}}),
    "observability": with_required(
        {
            "gateway": {
                "databaseUrl": "postgresql+psycopg://fleet:pw@postgres:5432/gateway",
                "autoscaling": {
                    "enabled": True,
                    "minReplicas": 2,
                    "maxReplicas": 6,
                    "targetCPUUtilizationPercentage": 60,
                },
            },
            "metrics": {
                "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "kube-prometheus-stack"}},
                "grafanaDashboard": {"enabled": True, "labels": {"grafana_dashboard": "1"}},
            },
            "networkPolicy": {"enabled": True},
        }
    ),
    "scaled": with_required(
        {
            "inference": {
                "replicas": 3,
                "gpus": 2,
                "cache": {"type": "pvc", "size": "80Gi", "storageClass": "fast-ssd"},
                "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
            "image": {"prefix": "registry.example.com/lorafleet", "tag": "0.1.0", "pullSecrets": ["regcred"]},
            "gateway": {"workers": 4, "resources": {"requests": {"cpu": 4, "memory": "1Gi"}}},
        }
    ),
    "kubernetes-jobs": with_required(
        {
            "trainer": {
                "launcher": "kubernetes",
                "jobs": {
                    "resources": {"requests": {"cpu": 8, "memory": "64Gi"}, "limits": {"memory": "96Gi"}},
                    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "startTimeoutSeconds": 900,
                    "activeDeadlineSeconds": 86400,
                    "ttlSecondsAfterFinished": 3600,
                    "modelCacheClaim": "lorafleet-models",
                    "serviceAccountName": "",
                },
            },
            "model": {"hfTokenSecret": "hf-token"},
            "networkPolicy": {"enabled": True},
        }
    ),
}
EXTERNAL_SECRETS = {"fleet-admin", "fleet-s3", "hf-token"}


@pytest.fixture(scope="module")
def rendered(render_chart: Render) -> dict[str, list[Rendered]]:
    return {name: render_chart(values) for name, values in COMBINATIONS.items()}


def find(docs: list[Rendered], kind: str, suffix: str = "") -> list[Rendered]:
    return [d for d in docs if d.kind == kind and d.name.endswith(suffix)]


def container(doc: Rendered) -> dict[str, Any]:
    pod = doc.manifest["spec"]["template"]["spec"]
    return pod["containers"][0]


def config_value(docs: list[Rendered], configmap_suffix: str, key: str) -> str:
    (cm,) = find(docs, "ConfigMap", configmap_suffix)
    return str(cm.manifest["data"][key])


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_every_manifest_validates_against_kubernetes(
    combination: str, rendered: dict[str, list[Rendered]], k8s_validate: ModuleType
) -> None:
    docs = rendered[combination]
    assert docs
    for doc in docs:
        if doc.kind == "ServiceMonitor":
            jsonschema.validate(doc.manifest, SERVICE_MONITOR_SCHEMA)
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                k8s_validate.validate(doc.manifest, version, strict=True)
            except k8s_validate.ValidationError as exc:
                path = "/".join(str(p) for p in exc.path)
                pytest.fail(f"{doc.template}: {doc.kind} {doc.name} invalid on {version} at {path}: {exc.message}")


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_manifests_reference_each_other_consistently(combination: str, rendered: dict[str, list[Rendered]]) -> None:
    assert reference_problems(rendered[combination], EXTERNAL_SECRETS) == []


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_every_pod_runs_as_non_root_with_a_read_only_root(
    combination: str, rendered: dict[str, list[Rendered]]
) -> None:
    for doc, pod, _ in pod_specs(rendered[combination]):
        assert pod["securityContext"]["runAsNonRoot"] is True, doc.name
        for c in pod["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, doc.name
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, doc.name


def test_strict_validation_is_not_vacuous(rendered: dict[str, list[Rendered]], k8s_validate: ModuleType) -> None:
    (gateway,) = find(rendered["defaults"], "Deployment", "-gateway")
    broken = copy.deepcopy(gateway.manifest)
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpcc"] = {"port": 1}
    with pytest.raises(k8s_validate.ValidationError):
        k8s_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def test_defaults_run_the_fleet_on_gpus_with_bundled_minio(rendered: dict[str, list[Rendered]]) -> None:
    docs = rendered["defaults"]
    kinds = {(d.kind, d.name.removeprefix("demo-lorafleet")) for d in docs}
    for expected in [
        ("Deployment", "-gateway"),
        ("Service", "-gateway"),
        ("StatefulSet", "-inference"),
        ("Service", "-inference-headless"),
        ("Deployment", "-trainer"),
        ("Service", "-trainer"),
        ("PersistentVolumeClaim", "-trainer"),
        ("StatefulSet", "-minio"),
        ("Service", "-minio"),
        ("Job", "-minio-bucket-1"),
        ("Secret", ""),
        ("ConfigMap", "-common"),
    ]:
        assert expected in kinds
    # One gateway by default (its SQLite holds tenants and keys): no gateway PDB to render.
    assert ("PodDisruptionBudget", "-gateway") not in kinds
    (inference,) = find(docs, "StatefulSet", "-inference")
    assert container(inference)["image"] == "lorafleet/inference:0.1.0"
    assert container(inference)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container(inference)["startupProbe"]["grpc"]["port"] == 50051
    (headless,) = find(docs, "Service", "-inference-headless")
    assert headless.manifest["spec"]["clusterIP"] == "None"
    assert config_value(docs, "-common", "LORAFLEET_BASE_MODEL") == "Qwen/Qwen2.5-7B-Instruct"
    assert config_value(docs, "-common", "LORAFLEET_S3_ENDPOINT") == "demo-lorafleet-minio:9000"
    assert config_value(docs, "-gateway", "LORAFLEET_GATEWAY_WORKERS") == "1"  # one process, as before workers
    # Jobs run in the trainer pod by default: it gets no Kubernetes API access at all.
    assert not find(docs, "Role") and not find(docs, "RoleBinding") and not find(docs, "ServiceAccount")
    (trainer,) = find(docs, "Deployment", "-trainer")
    assert trainer.manifest["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert container(trainer)["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_external_s3_uses_existing_secrets_and_no_minio(rendered: dict[str, list[Rendered]]) -> None:
    docs = rendered["external-s3"]
    assert not [d for d in docs if "minio" in d.name]
    assert config_value(docs, "-common", "LORAFLEET_S3_ENDPOINT") == "s3.storage.internal:443"
    assert config_value(docs, "-common", "LORAFLEET_S3_SECURE") == "true"
    assert config_value(docs, "-common", "LORAFLEET_STORE_URL") == "s3://fleet-prod/lorafleet"
    (secret,) = find(docs, "Secret")
    assert set(secret.manifest["data"]) == {"database-url"}  # the admin and S3 keys come from existing Secrets
    (gateway,) = find(docs, "Deployment", "-gateway")
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container(gateway)["env"] if "valueFrom" in e}
    assert refs == {
        "LORAFLEET_ADMIN_KEY": "fleet-admin",
        "LORAFLEET_S3_ACCESS_KEY": "fleet-s3",
        "LORAFLEET_S3_SECRET_KEY": "fleet-s3",
        "HF_TOKEN": "hf-token",
    }


def test_without_gpus_the_cpu_images_serve_the_embedded_model(rendered: dict[str, list[Rendered]]) -> None:
    docs = rendered["cpu"]
    images = {
        c["image"] for _, pod, _ in pod_specs(docs) for c in pod["containers"] if c["image"].startswith("lorafleet/")
    }
    assert images == {"lorafleet/gateway:0.1.0", "lorafleet/inference:0.1.0-cpu", "lorafleet/trainer:0.1.0-cpu"}
    assert "nvidia.com/gpu" not in json.dumps([d.manifest for d in docs])
    assert config_value(docs, "-common", "LORAFLEET_BASE_MODEL") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config_value(docs, "-inference", "LORAFLEET_INFERENCE_TENSOR_PARALLEL_SIZE") == "1"


def test_several_gateways_share_one_database(rendered: dict[str, list[Rendered]]) -> None:
    docs = rendered["observability"]
    (gateway,) = find(docs, "Deployment", "-gateway")
    env = {e["name"]: e for e in container(gateway)["env"]}
    assert env["LORAFLEET_GATEWAY_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "gateway-database-url"
    assert find(docs, "PodDisruptionBudget", "-gateway")


def test_observability_and_isolation_extras(rendered: dict[str, list[Rendered]]) -> None:
    docs = rendered["observability"]
    (hpa,) = find(docs, "HorizontalPodAutoscaler")
    assert hpa.manifest["spec"]["minReplicas"] == 2
    (gateway,) = find(docs, "Deployment", "-gateway")
    assert "replicas" not in gateway.manifest["spec"]  # the HPA owns it
    monitors = find(docs, "ServiceMonitor")
    assert len(monitors) == 3
    assert all(m.manifest["metadata"]["labels"]["release"] == "kube-prometheus-stack" for m in monitors)
    gateway_pods = gateway.manifest["spec"]["template"]["metadata"]["labels"]
    (trainer,) = find(docs, "Deployment", "-trainer")
    trainer_pods = trainer.manifest["spec"]["template"]["metadata"]["labels"]
    # The trainer reaches inference too: it asks the replicas to preload each adapter it publishes.
    callers = {"-inference": [gateway_pods, trainer_pods], "-trainer": [gateway_pods]}
    for suffix, pods in callers.items():
        (policy,) = find(docs, "NetworkPolicy", suffix)
        rules = policy.manifest["spec"]["ingress"]
        grpc_rules = [r for r in rules if r["ports"] == [{"port": "grpc", "protocol": "TCP"}]]
        assert [r["from"] for r in grpc_rules] == [[{"podSelector": {"matchLabels": p}} for p in pods]]
        assert all(r["ports"][0]["port"] == "metrics" for r in rules if r not in grpc_rules)
    (dashboard,) = find(docs, "ConfigMap", "-grafana-dashboard")
    assert json.loads(dashboard.manifest["data"]["lorafleet.json"]) == json.loads(
        (DEPLOY_DIR / "grafana" / "dashboards" / "lorafleet.json").read_text()
    )


def test_gateway_knows_every_inference_replica_by_its_stable_name(rendered: dict[str, list[Rendered]]) -> None:
    docs = rendered["scaled"]
    (inference,) = find(docs, "StatefulSet", "-inference")
    assert inference.manifest["spec"]["replicas"] == 3
    targets = config_value(docs, "-gateway", "LORAFLEET_GATEWAY_INFERENCE_TARGETS").split(",")
    service = inference.manifest["spec"]["serviceName"]
    assert targets == [f"demo-lorafleet-inference-{i}.{service}.fleet.svc.cluster.local:50051" for i in range(3)]
    assert config_value(docs, "-trainer", "LORAFLEET_TRAINER_NOTIFY_INFERENCE").split(",") == targets
    assert container(inference)["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert config_value(docs, "-inference", "LORAFLEET_INFERENCE_TENSOR_PARALLEL_SIZE") == "2"
    assert inference.manifest["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast-ssd"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container(inference)["volumeMounts"]
    assert container(inference)["image"] == "registry.example.com/lorafleet/inference:0.1.0"
    assert find(docs, "PodDisruptionBudget", "-inference")


def test_gateway_workers_become_its_setting(rendered: dict[str, list[Rendered]]) -> None:
    assert config_value(rendered["scaled"], "-gateway", "LORAFLEET_GATEWAY_WORKERS") == "4"


def test_kubernetes_jobs_launcher_gets_minimal_rbac_and_valid_settings(
    rendered: dict[str, list[Rendered]], k8s_validate: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered["kubernetes-jobs"]
    (role,) = find(docs, "Role", "-trainer")
    granted = sorted((r["apiGroups"], r["resources"], r["verbs"]) for r in role.manifest["rules"])
    assert granted == sorted(([group], [resource], list(verbs)) for group, resource, verbs in RBAC_RULES)
    (binding,) = find(docs, "RoleBinding", "-trainer")
    (account,) = find(docs, "ServiceAccount", "-trainer")
    assert binding.manifest["subjects"] == [{"kind": "ServiceAccount", "name": account.name, "namespace": "fleet"}]
    (trainer,) = find(docs, "Deployment", "-trainer")
    pod = trainer.manifest["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account.name and pod["automountServiceAccountToken"] is True
    assert "nvidia.com/gpu" not in json.dumps(pod)  # the GPUs go to the job pods

    # The trainer reads its ConfigMap as it would in the pod, and the Jobs it then builds are valid.
    (config,) = find(docs, "ConfigMap", "-trainer")
    (common,) = find(docs, "ConfigMap", "-common")
    for key, value in {**common.manifest["data"], **config.manifest["data"]}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path))
    monkeypatch.delenv("LORAFLEET_TRAINER_DATABASE_URL")
    settings = TrainerSettings()
    assert settings.launcher == "kubernetes" and settings.k8s_config == "in-cluster"
    assert settings.k8s_namespace == "fleet" and settings.k8s_image == "lorafleet/trainer:0.1.0"
    assert settings.k8s_gpu_resource == "nvidia.com/gpu" and settings.k8s_start_timeout_s == 900
    assert settings.k8s_env == [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}}
    ]
    spec = WorkerSpec(
        job_id="ftjob-1",
        manifest={"base_model": "m", "adapter_name": "a", "datasets": ["d.jsonl"], "resources": {"devices": 4}},
        store_url="s3://lorafleet",
        s3=S3Settings(endpoint="e", access_key="a", secret_key="s", secure=False, region=None, timeout_s=1),
        model_cache_dir="/m",
    )
    job = build_job(settings, "fleet", spec).job
    for version in KUBERNETES_VERSIONS:
        k8s_validate.validate(job, version, strict=True)
    job_pod = job["spec"]["template"]["spec"]
    assert job_pod["containers"][0]["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi"},
        "limits": {"memory": "96Gi", "nvidia.com/gpu": "4"},
    }
    assert job_pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    # The job pods may reach MinIO through its NetworkPolicy.
    (minio_policy,) = find(docs, "NetworkPolicy", "-minio")
    selectors = [p["podSelector"]["matchLabels"] for p in minio_policy.manifest["spec"]["ingress"][0]["from"]]
    assert any(s.items() <= job["spec"]["template"]["metadata"]["labels"].items() for s in selectors)


def test_every_template_is_exercised(rendered: dict[str, list[Rendered]]) -> None:
    templates = {p.relative_to(CHART_DIR / "templates").as_posix() for p in (CHART_DIR / "templates").rglob("*.yaml")}
    exercised = {d.template for docs in rendered.values() for d in docs}
    assert templates - exercised == set()


def test_dashboard_copy_in_the_chart_matches_deploy() -> None:
    chart_copy = CHART_DIR / "dashboards" / "lorafleet.json"
    assert chart_copy.read_text() == (DEPLOY_DIR / "grafana" / "dashboards" / "lorafleet.json").read_text()


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"s3": {"accessKey": "fleet", "secretKey": "fleet-secret"}}, "auth.adminKey"),
        ({"auth": {"adminKey": "k"}, "s3": {"secretKey": "fleet-secret"}}, "s3.accessKey"),
        ({"auth": {"adminKey": "k"}, "minio": {"enabled": False}, "s3": {"existingSecret": "s3"}}, "s3.endpoint"),
        ({"auth": {"adminKey": "k"}, "s3": {"accessKey": "fleet", "secretKey": "short"}}, "s3.secretKey"),
        (with_required({"inference": {"maxLoras": 16, "maxCpuLoras": 8}}), "inference.maxCpuLoras"),
        (with_required({"gateway": {"replicas": 2}}), "gateway.databaseUrl"),
        (with_required({"gateway": {"autoscaling": {"enabled": True}}}), "gateway.databaseUrl"),
    ],
    ids=[
        "admin-key",
        "s3-access-key",
        "external-s3-endpoint",
        "minio-password-length",
        "lora-cache-sizes",
        "several-gateways-without-shared-db",
        "autoscaled-gateways-without-shared-db",
    ],
)
def test_missing_required_values_fail_naming_the_value(
    values: dict[str, Any], named: str, render_chart: Render, helm_engine: ModuleType
) -> None:
    with pytest.raises(helm_engine.HelmError) as failure:
        render_chart(values)
    assert named in str(failure.value)


@pytest.mark.parametrize(
    ("values", "path"),
    [
        (with_required({"inference": {"replicas": "three"}}), "/inference/replicas"),
        (with_required({"gpu": {"enabled": "yes"}}), "/gpu/enabled"),
        (with_required({"inference": {"cache": {"type": "hostPath"}}}), "/inference/cache/type"),
        (with_required({"gateway": {"replica": 3}}), "/gateway"),
        (with_required({"inference": {"maxLoraRank": 24}}), "/inference/maxLoraRank"),
        (with_required({"gateway": {"workers": 0}}), "/gateway/workers"),
    ],
    ids=[
        "string-for-integer",
        "string-for-boolean",
        "unknown-enum",
        "misspelt-key",
        "rank-vllm-rejects",
        "no-gateway-worker",
    ],
)
def test_values_schema_rejects_wrong_values(
    values: dict[str, Any], path: str, render_chart: Render, helm_engine: ModuleType
) -> None:
    with pytest.raises(helm_engine.HelmValuesError) as failure:
        render_chart(values)
    assert path in str(failure.value)


def test_chart_passes_helm_lint_strict(helm_engine: ModuleType) -> None:
    report = helm_engine.lint(CHART_DIR, REQUIRED, strict=True, kube_version="v1.28.0")
    findings = [m for m in report["messages"] if m["severity"] >= 2]
    assert (findings, report["errors"]) == ([], [])
