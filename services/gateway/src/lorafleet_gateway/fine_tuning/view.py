"""Trainer Job / JobEvent -> OpenAI fine_tuning.job / fine_tuning.job.event objects."""

from __future__ import annotations

import json
from typing import Any

from lorafleet.trainer.v1 import trainer_pb2
from lorafleet_gateway.tenancy.namespace import model_id

JOB_STATUS: dict[int, str] = {
    trainer_pb2.JOB_STATE_UNSPECIFIED: "queued",
    trainer_pb2.JOB_STATE_QUEUED: "queued",
    trainer_pb2.JOB_STATE_VALIDATING: "validating_files",
    trainer_pb2.JOB_STATE_RUNNING: "running",
    trainer_pb2.JOB_STATE_SUCCEEDED: "succeeded",
    trainer_pb2.JOB_STATE_FAILED: "failed",
    trainer_pb2.JOB_STATE_CANCELLED: "cancelled",
}
TENANT_LABEL = "tenant"
DATASETS_LABEL = "datasets"  # JSON list of {file, samples, format}, written by the gateway at create


def dataset_mix_of(labels: dict[str, str]) -> list[dict[str, Any]]:
    """The files a job trains on, as the gateway recorded them; older jobs: just their training_file."""
    try:
        recorded = json.loads(labels.get(DATASETS_LABEL, ""))
    except ValueError:
        recorded = None
    if isinstance(recorded, list) and all(isinstance(e, dict) and isinstance(e.get("file"), str) for e in recorded):
        return [{"file": e["file"], "samples": e.get("samples"), "format": e.get("format", "auto")} for e in recorded]
    file = labels.get("training_file")
    return [{"file": file, "samples": None, "format": "auto"}] if file else []


def _label_number(labels: dict[str, str], key: str, kind: type[int] | type[float]) -> int | float | str:
    value = labels.get(key, "auto")
    try:
        return kind(value)
    except ValueError:
        return "auto"


def _timestamp(seconds: float) -> int | None:
    return int(seconds) if seconds > 0 else None


def job_object(job: trainer_pb2.Job, tenant: str) -> dict[str, Any]:
    """The OpenAI FineTuningJob for a tenant's trainer job (hyperparameters come from the labels the gateway set).

    The trainer knows the adapter's store name ("<tenant>/ft:..."); the tenant sees its model id.
    """
    labels = dict(job.labels)
    status = JOB_STATUS.get(job.state, "queued")
    hyperparameters = {
        "n_epochs": _label_number(labels, "n_epochs", int),
        "batch_size": _label_number(labels, "batch_size", int),
        "learning_rate_multiplier": _label_number(labels, "learning_rate_multiplier", float),
    }
    seed = _label_number(labels, "seed", int)
    error = None
    if status == "failed":
        error = {"code": "training_failed", "message": job.error or "the training job failed", "param": None}
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": int(job.created_at),
        "finished_at": _timestamp(job.finished_at),
        "model": labels.get("model") or job.base_model,
        "fine_tuned_model": (model_id(tenant, job.adapter_name) or job.adapter_name) if status == "succeeded" else None,
        "organization_id": tenant,
        "status": status,
        "hyperparameters": hyperparameters,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "training_file": labels.get("training_file", ""),
        "validation_file": labels.get("validation_file"),
        "result_files": [],
        "trained_tokens": job.trained_tokens if status == "succeeded" else None,
        "error": error,
        "seed": seed if isinstance(seed, int) else None,
        "user_provided_suffix": labels.get("suffix"),
        "estimated_finish": None,
        "integrations": [],
        "metadata": None,
        # LoRA Fleet extension (OpenAI clients ignore unknown fields): live progress for dashboards and the CLI.
        "lorafleet": {
            "step": job.step,
            "total_steps": job.total_steps,
            "loss": round(float(job.loss), 6) if job.step else None,
            "started_at": _timestamp(job.started_at),
            "adapter_version": job.adapter_version or None,
            # What it trains on: training_file, then lorafleet.datasets (samples null = every row).
            "datasets": dataset_mix_of(labels),
        },
    }


def event_id(job_id: str, seq: int) -> str:
    return f"ftevent-{job_id.removeprefix('ftjob-')}-{seq}"


def event_seq(event_id_: str) -> int | None:
    """The trainer sequence number inside an event id from event_id(); None if it is not one."""
    tail = event_id_.rsplit("-", 1)[-1]
    # isascii: str.isdigit() also accepts digits such as '²' that int() refuses.
    return int(tail) if event_id_.startswith("ftevent-") and tail.isascii() and tail.isdigit() else None


def event_object(event: trainer_pb2.JobEvent, job: trainer_pb2.Job, tenant: str) -> dict[str, Any]:
    """The OpenAI event; trainer messages name the adapter's store name, shown as the tenant's model id."""
    status = JOB_STATUS.get(event.state, "queued")
    visible = model_id(tenant, job.adapter_name)
    text = event.message.replace(job.adapter_name, visible) if visible and job.adapter_name else event.message
    base = {
        "id": event_id(event.job_id, event.seq),
        "object": "fine_tuning.job.event",
        "created_at": int(event.time),
        "level": "error" if event.kind == "state" and status == "failed" else "info",
    }
    if event.kind == "progress" and event.HasField("progress"):
        p = event.progress
        data = {
            "step": p.step,
            "total_steps": p.total_steps,
            "train_loss": p.loss,
            "learning_rate": p.learning_rate,
            "tokens_per_second": p.tokens_per_second,
            "epoch": p.epoch,
        }
        if p.HasField("eval_loss"):  # the trainer evaluates the whole validation set: OpenAI's full_valid_loss
            data["valid_loss"] = data["full_valid_loss"] = p.eval_loss
        message = text or f"Step {p.step}/{p.total_steps}: training loss={p.loss:.4f}"
        return {**base, "message": message, "type": "metrics", "data": data}
    message = text or f"Job {status}"
    return {**base, "message": message, "type": "message", "data": {"kind": event.kind, "status": status}}


def checkpoint_object(event: trainer_pb2.JobEvent, fine_tuned_model: str | None) -> dict[str, Any]:
    """An OpenAI fine_tuning.job.checkpoint for a trainer "checkpoint" event (its progress, when it has one)."""
    step = event.progress.step if event.HasField("progress") else 0
    metrics: dict[str, Any] = {"step": step}
    if event.HasField("progress"):
        p = event.progress
        valid_loss = p.eval_loss if p.HasField("eval_loss") else None
        metrics.update(
            train_loss=p.loss, valid_loss=valid_loss, full_valid_loss=valid_loss, full_valid_mean_token_accuracy=None
        )
    return {
        "id": f"ftckpt-{event.job_id.removeprefix('ftjob-')}-{event.seq}",
        "object": "fine_tuning.job.checkpoint",
        "created_at": int(event.time),
        "fine_tuned_model_checkpoint": f"{fine_tuned_model or event.job_id}:ckpt-step-{step}",
        "fine_tuning_job_id": event.job_id,
        "metrics": metrics,
        "step_number": step,
    }
