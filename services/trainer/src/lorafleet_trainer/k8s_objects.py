"""The Kubernetes objects one training job runs as: a Secret with its spec and a batch/v1 Job.

Plain dicts (the API's JSON), built from the settings alone, so a test can check them against the
strict Kubernetes schemas without a cluster. launch_k8s.py creates and watches them.

Inside the pod the worker's home is an emptyDir at ``POD_HOME`` (the images' HOME), which is also its
job folder; the spec is the Secret mounted read-only at ``POD_SPEC_FILE`` (the worker finds it
through ``LORAFLEET_WORKER_SPEC_FILE``); the base-model cache is ``POD_MODELS``, a claim when one is
configured.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any

from lorafleet_trainer.launch import requested_devices, worker_command
from lorafleet_trainer.protocol import SPEC_FILE, SPEC_FILE_ENV, WorkerSpec
from lorafleet_trainer.settings import TrainerSettings

POD_HOME = "/var/lib/lorafleet"
POD_MODELS = f"{POD_HOME}/models"
POD_SPEC_DIR = "/etc/lorafleet/job"
POD_SPEC_FILE = f"{POD_SPEC_DIR}/{SPEC_FILE}"
CONTAINER = "worker"
# The trainer images run as this user (deploy/docker/trainer*.Dockerfile); the chart's pods do too.
IMAGE_UID = 10001

# Labels and annotations the trainer puts on what it creates. JOB_LABEL selects one training job's
# Jobs (an exact id is not a valid label value: it may hold "_" or end in "-"); TRAINER_LABEL scopes
# them to one trainer (its name prefix), so two trainers in one namespace never touch each other's.
JOB_LABEL = "lorafleet.io/job"
TRAINER_LABEL = "lorafleet.io/trainer"
JOB_ID_ANNOTATION = "lorafleet.io/job-id"
# The Job controller labels each pod it creates with the Job's name.
POD_JOB_NAME_LABEL = "job-name"

_NOT_DNS = re.compile(r"[^a-z0-9-]+")
MAX_NAME = 63  # a Job's name becomes its pods' job-name label value: 63 characters at most


def job_label_value(job_id: str) -> str:
    """A valid label value naming exactly one job id (readable part + hash of the exact id)."""
    slug = _NOT_DNS.sub("-", job_id.lower())[:50]
    return f"{slug}-{hashlib.sha256(job_id.encode()).hexdigest()[:8]}"


def new_job_name(prefix: str, job_id: str) -> str:
    """``<prefix>-<job id, DNS-safe>-<random>``: a new name per launch, so a re-queued job's new Job never
    collides with the previous attempt's, which may still be terminating."""
    suffix = secrets.token_hex(3)
    slug = _NOT_DNS.sub("-", job_id.lower())
    return f"{prefix}-{slug}"[: MAX_NAME - len(suffix) - 1].rstrip("-") + f"-{suffix}"


def pod_spec_of(spec: WorkerSpec) -> WorkerSpec:
    """The spec as the pod sees it: its model cache is the pod's, not the trainer's."""
    return spec.model_copy(update={"model_cache_dir": POD_MODELS})


@dataclass(frozen=True)
class JobObjects:
    """The names and bodies of one launch."""

    name: str
    job: dict[str, Any]
    labels: dict[str, str]

    def secret(self, spec: WorkerSpec, job_uid: str) -> dict[str, Any]:
        """The spec Secret, owned by the Job (deleting the Job deletes it). blockOwnerDeletion stays off: it
        would need the right to update the Job's finalizers."""
        data = base64.b64encode(pod_spec_of(spec).model_dump_json().encode()).decode()
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": self.name,
                "namespace": self.job["metadata"]["namespace"],
                "labels": self.labels,
                "annotations": {JOB_ID_ANNOTATION: spec.job_id},
                "ownerReferences": [
                    {"apiVersion": "batch/v1", "kind": "Job", "name": self.name, "uid": job_uid, "controller": False}
                ],
            },
            "type": "Opaque",
            "immutable": True,
            "data": {SPEC_FILE: data},
        }


def build_job(settings: TrainerSettings, namespace: str, spec: WorkerSpec) -> JobObjects:
    s = settings
    name = new_job_name(s.k8s_name_prefix, spec.job_id)
    labels = {
        **s.k8s_labels,
        "app.kubernetes.io/managed-by": "lorafleet-trainer",
        TRAINER_LABEL: s.k8s_name_prefix,
        JOB_LABEL: job_label_value(spec.job_id),
    }
    annotations = {JOB_ID_ANNOTATION: spec.job_id}
    devices = requested_devices(spec.manifest)
    # Quantities are strings in the API ("8", "0.5", "64Gi"); a chart value may arrive as a number.
    resources = {kind: {k: str(v) for k, v in amounts.items()} for kind, amounts in s.k8s_resources.items()}
    if s.k8s_gpu_resource:
        resources.setdefault("limits", {})[s.k8s_gpu_resource] = str(devices)
    mounts: list[dict[str, Any]] = [
        {"name": "home", "mountPath": POD_HOME},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "spec", "mountPath": POD_SPEC_DIR, "readOnly": True},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "home", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        # Data loader workers and NCCL share memory through /dev/shm (64 MB by default).
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
        {"name": "spec", "secret": {"secretName": name, "defaultMode": 0o440}},
    ]
    if s.k8s_model_cache_claim:
        mounts.append({"name": "models", "mountPath": POD_MODELS})
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": s.k8s_model_cache_claim}})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": s.k8s_image,
        # The command the local launcher runs (torchrun for several devices), with the pod's paths.
        "command": worker_command("python", devices, POD_HOME),
        "env": [
            {"name": SPEC_FILE_ENV, "value": POD_SPEC_FILE},
            {"name": "HOME", "value": POD_HOME},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            *s.k8s_env,
        ],
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if s.k8s_image_pull_policy:
        container["imagePullPolicy"] = s.k8s_image_pull_policy
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        # The workers need no Kubernetes API access: no token in the pod.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # What a cancel's SIGTERM gives the worker; the Job's garbage collector deletes its pod with it.
        "terminationGracePeriodSeconds": math.ceil(s.cancel_grace_s),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": IMAGE_UID,
            "runAsGroup": IMAGE_UID,
            "fsGroup": IMAGE_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if s.k8s_service_account:
        pod["serviceAccountName"] = s.k8s_service_account
    if s.k8s_node_selector:
        pod["nodeSelector"] = dict(s.k8s_node_selector)
    if s.k8s_tolerations:
        pod["tolerations"] = list(s.k8s_tolerations)
    if s.k8s_image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in s.k8s_image_pull_secrets]
    job_spec: dict[str, Any] = {
        # The trainer owns retries: a failed attempt is a failed job, a re-queued one resumes from its checkpoint.
        "backoffLimit": 0,
        "ttlSecondsAfterFinished": s.k8s_ttl_after_finished_s,
        "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod},
    }
    if s.k8s_active_deadline_s:
        job_spec["activeDeadlineSeconds"] = s.k8s_active_deadline_s
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations},
        "spec": job_spec,
    }
    return JobObjects(name=name, job=job, labels=labels)
