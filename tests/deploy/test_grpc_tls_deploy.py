"""gRPC mTLS in the deployment artefacts: the chart with grpcTls.enabled (rendered by Helm's engine, strict
Kubernetes schemas) and deploy/docker-compose.grpc-tls.yml layered on the compose file (the real compose CLI);
and the gateway's /metrics scraped with the admin key in both."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import yaml

from tests.deploy.conftest import DEPLOY_DIR, Render
from tests.deploy.manifest_checks import SERVICE_MONITOR_SCHEMA, Rendered, reference_problems
from tests.deploy.test_compose import active, compose, env_file, volume_mount
from tests.deploy.test_helm_chart import KUBERNETES_VERSIONS, config_value, container, find, with_required

TLS_VALUES = with_required(
    {
        "grpcTls": {"enabled": True, "secretName": "fleet-grpc-tls", "serverName": "grpc.fleet.internal"},
        "metrics": {"serviceMonitor": {"enabled": True}},
    }
)
MOUNT = "/etc/lorafleet/grpc-tls"
TLS_ENV = {
    "LORAFLEET_GRPC_TLS_CERT": f"{MOUNT}/tls.crt",
    "LORAFLEET_GRPC_TLS_KEY": f"{MOUNT}/tls.key",
    "LORAFLEET_GRPC_TLS_CA": f"{MOUNT}/ca.crt",
}


@pytest.fixture(scope="module")
def tls_docs(render_chart: Render) -> list[Rendered]:
    return render_chart(TLS_VALUES)


def test_chart_with_grpc_tls_validates(tls_docs: list[Rendered], k8s_validate: ModuleType) -> None:
    import jsonschema

    for doc in tls_docs:
        if doc.kind == "ServiceMonitor":
            jsonschema.validate(doc.manifest, SERVICE_MONITOR_SCHEMA)
            continue
        for version in KUBERNETES_VERSIONS:
            k8s_validate.validate(doc.manifest, version, strict=True)
    assert reference_problems(tls_docs, {"fleet-grpc-tls"}) == []


def test_chart_mounts_the_certificate_everywhere_and_probes_over_tls(tls_docs: list[Rendered]) -> None:
    for name, value in TLS_ENV.items():
        assert config_value(tls_docs, "-common", name) == value
    assert config_value(tls_docs, "-common", "LORAFLEET_GRPC_TLS_SERVER_NAME") == "grpc.fleet.internal"
    workloads = {
        "gateway": find(tls_docs, "Deployment", "-gateway")[0],
        "trainer": find(tls_docs, "Deployment", "-trainer")[0],
        "inference": find(tls_docs, "StatefulSet", "-inference")[0],
    }
    for component, doc in workloads.items():
        pod = doc.manifest["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["grpc-tls"]["secret"] == {"secretName": "fleet-grpc-tls", "defaultMode": 0o440}, component
        assert {"name": "grpc-tls", "mountPath": MOUNT, "readOnly": True} in container(doc)["volumeMounts"]
    # Native grpc probes cannot present a client certificate: the image's health check does.
    for component, port in (("inference", 50051), ("trainer", 50061)):
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            handler = container(workloads[component])[probe]
            assert "grpc" not in handler
            assert handler["exec"]["command"][:3] == ["python3", "-m", "lorafleet_common.healthcheck"]
            assert handler["exec"]["command"][-1] == f"127.0.0.1:{port}"
            assert handler["timeoutSeconds"] >= 5  # python start-up plus the check's own 3 s


def test_grpc_tls_without_a_secret_fails_naming_the_value(render_chart: Render, helm_engine: ModuleType) -> None:
    with pytest.raises(helm_engine.HelmError) as failure:
        render_chart(with_required({"grpcTls": {"enabled": True}}))
    assert "grpcTls.secretName" in str(failure.value)


def test_default_chart_keeps_plaintext_grpc(render_chart: Render) -> None:
    docs = render_chart(with_required({}))
    (common,) = find(docs, "ConfigMap", "-common")
    assert not [k for k in common.manifest["data"] if "GRPC_TLS" in k]
    (inference,) = find(docs, "StatefulSet", "-inference")
    assert container(inference)["readinessProbe"]["grpc"] == {"port": 50051}
    assert "grpc-tls" not in {v["name"] for v in inference.manifest["spec"]["template"]["spec"]["volumes"]}


def test_gateway_metrics_are_scraped_with_the_admin_key(tls_docs: list[Rendered]) -> None:
    (monitor,) = find(tls_docs, "ServiceMonitor", "-gateway")
    (endpoint,) = monitor.manifest["spec"]["endpoints"]
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "demo-lorafleet", "key": "admin-key"},
    }
    prometheus = yaml.safe_load((DEPLOY_DIR / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "lorafleet-gateway"]
    assert job["authorization"]["credentials_file"] == "/tmp/gateway-admin-key"


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_compose_overlay_turns_grpc_tls_on_for_the_three_services(
    compose_bin: str, tmp_path: Path, profile: str
) -> None:
    tls_dir = tmp_path / "certs"
    env = env_file(tmp_path, LORAFLEET_GRPC_TLS_DIR=str(tls_dir))
    overlay = DEPLOY_DIR / "docker-compose.grpc-tls.yml"
    result = compose(compose_bin, env, "-f", str(overlay), "--profile", profile, "config")
    assert result.returncode == 0, result.stderr
    running = active(yaml.safe_load(result.stdout)["services"], profile)
    suffix = "" if profile == "gpu" else "-cpu"
    for name in ("inference", "trainer", "gateway"):
        svc = running[name + suffix]
        assert {k: svc["environment"][k] for k in TLS_ENV} == TLS_ENV, name
        assert svc["environment"]["LORAFLEET_GRPC_TLS_SERVER_NAME"] == "lorafleet-grpc"
        assert (str(tls_dir), MOUNT) in {volume_mount(m) for m in svc["volumes"]}, name
        assert svc["environment"]["LORAFLEET_BASE_MODEL"]  # the base file's settings are kept
    # Without the overlay nothing changes: plaintext gRPC.
    plain = compose(compose_bin, env, "--profile", profile, "config")
    assert "GRPC_TLS" not in plain.stdout


def test_compose_prometheus_gets_the_admin_key_as_a_file(compose_bin: str, tmp_path: Path) -> None:
    result = compose(compose_bin, env_file(tmp_path), "config")
    assert result.returncode == 0, result.stderr
    prometheus = yaml.safe_load(result.stdout)["services"]["prometheus"]
    assert prometheus["environment"]["LORAFLEET_ADMIN_KEY"] == "lf-admin-test"
    assert "/tmp/gateway-admin-key" in prometheus["command"][0] and "exec /bin/prometheus" in prometheus["command"][0]
