"""Checks a set of rendered manifests must pass beyond their own schemas.

kubernetes-validate checks each manifest alone against the Kubernetes OpenAPI schemas. What breaks
real releases is usually between manifests: a Service selecting no pod, a named port that does not
exist, a ConfigMap that was never rendered. `reference_problems` lists those.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Rendered:
    """One rendered manifest and the template that produced it."""

    template: str
    manifest: Manifest

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])


# ServiceMonitor is a Prometheus Operator CRD, outside kubernetes-validate's schemas. This is the part
# of its CRD schema (monitoring.coreos.com/v1) the chart uses, strict like the built-in kinds.
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "labels": _LABELS, "annotations": _LABELS},
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "additionalProperties": False, "properties": {"matchLabels": _LABELS}},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "authorization": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "type": {"type": "string"},
                                    "credentials": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["key"],
                                        "properties": {"name": {"type": "string"}, "key": {"type": "string"}},
                                    },
                                },
                            },
                            "interval": {
                                "type": "string",
                                "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                "(([0-9]+)s)?(([0-9]+)ms)?)$",
                            },
                        },
                    },
                },
            },
        },
    },
}

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job"}


def pod_specs(docs: Iterable[Rendered]) -> list[tuple[Rendered, Manifest, dict[str, str]]]:
    """(document, pod spec, pod labels) of every workload and bare Pod."""
    out = []
    for doc in docs:
        if doc.kind in WORKLOAD_KINDS:
            template = doc.manifest["spec"]["template"]
            out.append((doc, template["spec"], template["metadata"].get("labels", {})))
        elif doc.kind == "Pod":
            out.append((doc, doc.manifest["spec"], doc.manifest["metadata"].get("labels", {})))
    return out


def container_ports(pod_spec: Manifest) -> set[str]:
    return {p["name"] for c in pod_spec["containers"] for p in c.get("ports", []) if "name" in p}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def reference_problems(docs: list[Rendered], external_secrets: Iterable[str] = ()) -> list[str]:
    """Every dangling reference between the manifests, as readable lines (empty when consistent)."""
    problems: list[str] = []
    names = {(d.kind, d.name) for d in docs}
    pods = pod_specs(docs)

    for doc in docs:
        spec = doc.manifest.get("spec", {})
        if doc.kind == "Service":
            selected = [p for p in pods if matches(spec["selector"], p[2])]
            if not selected:
                problems.append(f"Service {doc.name} selects no pod")
            for port in spec["ports"]:
                target = port.get("targetPort")
                if isinstance(target, str) and not all(target in container_ports(p[1]) for p in selected):
                    problems.append(f"Service {doc.name}: targetPort {target} is not a container port")
        elif doc.kind == "ServiceMonitor":
            services = [
                d
                for d in docs
                if d.kind == "Service" and matches(spec["selector"]["matchLabels"], d.manifest["metadata"]["labels"])
            ]
            if not services:
                problems.append(f"ServiceMonitor {doc.name} selects no Service")
            for endpoint in spec["endpoints"]:
                if not all(endpoint["port"] in {p["name"] for p in s.manifest["spec"]["ports"]} for s in services):
                    problems.append(f"ServiceMonitor {doc.name}: port {endpoint['port']} is not a Service port")
        elif doc.kind in ("PodDisruptionBudget", "NetworkPolicy"):
            selector = spec["selector" if doc.kind == "PodDisruptionBudget" else "podSelector"]["matchLabels"]
            selected = [p for p in pods if matches(selector, p[2])]
            if not selected:
                problems.append(f"{doc.kind} {doc.name} selects no pod")
            for rule in spec.get("ingress", []):
                for port in rule.get("ports", []):
                    if isinstance(port["port"], str) and not all(
                        port["port"] in container_ports(p[1]) for p in selected
                    ):
                        problems.append(f"NetworkPolicy {doc.name}: port {port['port']} is not a container port")
        elif doc.kind == "HorizontalPodAutoscaler":
            target = spec["scaleTargetRef"]
            if (target["kind"], target["name"]) not in names:
                problems.append(f"HPA {doc.name} scales {target['kind']} {target['name']}, which is not rendered")
        elif doc.kind == "StatefulSet" and ("Service", spec["serviceName"]) not in names:
            problems.append(f"StatefulSet {doc.name}: serviceName {spec['serviceName']} is not rendered")
        elif doc.kind == "RoleBinding" and ("Role", doc.manifest["roleRef"]["name"]) not in names:
            problems.append(f"RoleBinding {doc.name}: Role {doc.manifest['roleRef']['name']} is not rendered")

    for doc, pod_spec, _ in pods:
        problems.extend(_pod_reference_problems(doc, pod_spec, names, external_secrets))
    return problems


def _pod_reference_problems(
    doc: Rendered, pod_spec: Manifest, names: set[tuple[str, str]], external_secrets: Iterable[str]
) -> list[str]:
    problems = []
    secrets = {n for k, n in names if k == "Secret"} | set(external_secrets)
    volumes = {v["name"] for v in pod_spec.get("volumes", [])}
    volumes |= {t["metadata"]["name"] for t in doc.manifest.get("spec", {}).get("volumeClaimTemplates", [])}
    sa = pod_spec.get("serviceAccountName")
    if sa and ("ServiceAccount", sa) not in names:
        problems.append(f"{doc.kind} {doc.name}: ServiceAccount {sa} is not rendered")
    for volume in pod_spec.get("volumes", []):
        claim = volume.get("persistentVolumeClaim", {}).get("claimName")
        if claim and ("PersistentVolumeClaim", claim) not in names:
            problems.append(f"{doc.kind} {doc.name}: PVC {claim} is not rendered")
    for container in pod_spec["containers"]:
        ports = container_ports(pod_spec)
        for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container.get(probe_name, {})
            for handler in ("httpGet", "tcpSocket"):
                port = probe.get(handler, {}).get("port")
                if isinstance(port, str) and port not in ports:
                    problems.append(f"{doc.name}/{container['name']}: {probe_name} port {port} is not a container port")
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef", {}).get("name")
            if ref and ("ConfigMap", ref) not in names:
                problems.append(f"{doc.name}/{container['name']}: ConfigMap {ref} is not rendered")
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef", {}).get("name")
            if ref and ref not in secrets:
                problems.append(f"{doc.name}/{container['name']}: Secret {ref} is neither rendered nor external")
        for mount in container.get("volumeMounts", []):
            if mount["name"] not in volumes:
                problems.append(f"{doc.name}/{container['name']}: volume {mount['name']} is not defined")
    return problems
