"""The trainer's settings: built once in ``main`` and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from lorafleet_common.grpc_targets import check_targets, split_targets
from lorafleet_common.settings import CommonSettings


class TrainerSettings(CommonSettings):
    """Everything the trainer reads from the environment (``LORAFLEET_TRAINER_*`` plus the shared fields)."""

    model_config = SettingsConfigDict(
        env_prefix="LORAFLEET_TRAINER_", env_ignore_empty=True, extra="ignore", populate_by_name=True
    )

    host: str = Field(default="127.0.0.1", description="Address the gRPC and metrics servers bind to.")
    grpc_port: int = Field(default=50061, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    metrics_port: int = Field(default=9102, ge=0, le=65535, description="Prometheus /metrics port; 0 turns it off.")
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the job database (sqlite or postgresql). Default: sqlite:///<home>/trainer.db.",
    )
    work_dir: Path | None = Field(
        default=None, description="Folder for per-job scratch space (spec, logs, adapter). Default: <home>/jobs."
    )
    launcher: Literal["local", "kubernetes"] = Field(
        default="local",
        description='Where job workers run: "local" (a process group on this host; torchrun for a job asking for '
        'several GPUs) or "kubernetes" (one Kubernetes Job per training job, see docs/scale-out.md).',
    )
    # launcher="kubernetes" only (docs/scale-out.md#kubernetes-jobs); JSON for the structured ones.
    k8s_config: Literal["auto", "in-cluster", "kubeconfig"] = Field(
        default="auto",
        description='How the trainer reaches the Kubernetes API: "in-cluster" (its pod\'s service account), '
        '"kubeconfig" (K8S_KUBECONFIG or ~/.kube/config), "auto" (in-cluster when running in a pod).',
    )
    k8s_kubeconfig: Path | None = Field(
        default=None, description="kubeconfig file; unset: $KUBECONFIG or ~/.kube/config."
    )
    k8s_context: str | None = Field(default=None, description="kubeconfig context; unset: its current context.")
    k8s_namespace: str | None = Field(
        default=None,
        description="Namespace of the job pods; unset: the trainer's own (in-cluster) or the context's namespace.",
    )
    k8s_image: str = Field(
        default="", description="Image of the job pods: the trainer image (required with launcher=kubernetes)."
    )
    k8s_image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="imagePullPolicy of the job pods; unset: the cluster's default."
    )
    k8s_image_pull_secrets: list[str] = Field(
        default_factory=list, description="Names of docker-registry Secrets for the job pods (JSON list)."
    )
    k8s_service_account: str | None = Field(
        default=None,
        description="ServiceAccount of the job pods (they get no API token); unset: the namespace default.",
    )
    k8s_name_prefix: str = Field(
        default="lorafleet",
        pattern=r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$",
        description="Prefix of the Job and Secret names; it also marks this trainer's Jobs, so two trainers "
        "sharing a namespace need different ones.",
    )
    k8s_labels: dict[str, str] = Field(
        default_factory=dict, description="Extra labels on the Jobs and their pods (JSON object), e.g. for policies."
    )
    k8s_node_selector: dict[str, str] = Field(
        default_factory=dict, description="nodeSelector of the job pods (JSON object)."
    )
    k8s_tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Tolerations of the job pods (JSON list of Kubernetes Toleration objects)."
    )
    k8s_resources: dict[str, dict[str, str | int | float]] = Field(
        default_factory=dict,
        description='CPU/memory of the job container (JSON: {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": '
        "{...}}). The GPU limit is added per job: K8S_GPU_RESOURCE × the manifest's resources.devices.",
    )
    k8s_gpu_resource: str = Field(
        default="nvidia.com/gpu",
        description='Extended resource a job asks for, one per device of its manifest; "none" for CPU-only clusters.',
    )
    k8s_env: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Extra environment of the job container (JSON list of Kubernetes EnvVar objects, e.g. HF_TOKEN "
        "from a Secret). The S3 keys travel in the job's own Secret, not here.",
    )
    k8s_model_cache_claim: str | None = Field(
        default=None,
        description="PersistentVolumeClaim mounted as the job pods' model cache (ReadWriteMany to share it between "
        "nodes); unset: an emptyDir, so each job fetches its base model again.",
    )
    k8s_start_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="A job whose pod is not running after this long (image pull error, unschedulable) fails with the "
        "pod's reason. Leave room for pulling a large GPU image.",
    )
    k8s_active_deadline_s: int | None = Field(
        default=None, gt=0, description="activeDeadlineSeconds of each Job: Kubernetes stops a job running longer."
    )
    k8s_ttl_after_finished_s: int = Field(
        default=3600,
        ge=0,
        description="ttlSecondsAfterFinished: the trainer deletes each Job when it is done; this removes those a "
        "crashed trainer left.",
    )
    k8s_api_timeout_s: float = Field(default=30.0, gt=0, description="Deadline of one Kubernetes API call.")
    k8s_log_idle_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="A job's log stream silent this long is re-opened (after checking the pod), so a dropped "
        "connection cannot hang the job.",
    )
    serving_max_lora_rank: int = Field(
        default=16,
        ge=1,
        description="Highest LoRA rank the inference service serves; manifests asking for more are refused.",
    )
    torch_threads: int = Field(default=0, ge=0, description="torch intra-op threads in the worker; 0 = torch default.")
    hub_download: bool = Field(
        default=False,
        description="Let the worker download a base model from the Hugging Face hub when it is not cached locally.",
    )
    checkpoint_keep: int = Field(
        default=2,
        ge=1,
        description="Resumable checkpoints kept per running job (the newest); all are deleted when the job ends.",
    )
    notify_inference: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description='Inference replicas told to load each adapter the trainer publishes: "host:port" or '
        '"dns:///name:port" (every address the name resolves to); a comma-separated string or a JSON list in the '
        "env. Best effort: a failure is a warning event on the job, never a failed job. Empty: nobody is told.",
    )
    notify_timeout_s: float = Field(
        default=30.0, gt=0, description="Deadline of one LoadAdapter call made to an inference replica."
    )
    job_poll_interval_s: float = Field(
        default=2.0, gt=0, description="How often the scheduler re-checks the queue when nothing woke it."
    )
    cancel_grace_s: float = Field(
        default=5.0, gt=0, description="Seconds a worker gets after SIGTERM before it is killed (cancel, shutdown)."
    )
    shutdown_grace_s: float = Field(default=5.0, gt=0, description="Seconds in-flight RPCs get on shutdown.")
    store_call_timeout_s: float = Field(
        default=30.0, gt=0, description="Upper bound on one object-store or database call made by the service."
    )

    @field_validator("notify_inference", mode="before")
    @classmethod
    def _split_targets(cls, value: Any) -> Any:
        return split_targets(value)

    @field_validator("notify_inference")
    @classmethod
    def _check_targets(cls, value: list[str]) -> list[str]:
        return check_targets(value)

    @field_validator("k8s_resources")
    @classmethod
    def _check_k8s_resources(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if unknown := set(value) - {"requests", "limits"}:
            raise ValueError(f"only requests and limits may be set, not {sorted(unknown)}")
        return value

    @field_validator("k8s_gpu_resource")
    @classmethod
    def _no_gpu_resource(cls, value: str) -> str:
        return "" if value.strip().lower() == "none" else value.strip()  # an empty env value means "the default"

    @model_validator(mode="after")
    def _check_launcher(self) -> Self:
        if self.launcher == "kubernetes" and not self.k8s_image:
            raise ValueError("LORAFLEET_TRAINER_K8S_IMAGE is required with LORAFLEET_TRAINER_LAUNCHER=kubernetes")
        return self

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'trainer.db').resolve()}"

    def resolved_work_dir(self) -> Path:
        return (self.work_dir or self.home / "jobs").resolve()
