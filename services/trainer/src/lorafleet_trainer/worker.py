"""One training job, in its own process: ``python -m lorafleet_trainer.worker <job-dir>``.

Reads ``<job-dir>/spec.json``, checks the datasets and the base model
(VALIDATING), trains (RUNNING), saves and publishes the adapter, and reports
each step as a JSON line on stdout. Anything else the libraries print goes to
stderr (the job's log), so it cannot corrupt the event stream.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from lorafleet_common.adapters import publish_adapter
from lorafleet_common.embedded_model import resolve_base_model
from lorafleet_common.logs import configure_logging
from lorafleet_common.store import ObjectStore, StoreError, open_store
from lorafleet_trainer.checkpoint import (
    Checkpoint,
    CheckpointUnusable,
    LoopState,
    adapter_weights,
    data_fingerprint,
    discard_checkpoints,
    load_latest_checkpoint,
    restore_adapter,
    save_checkpoint,
)
from lorafleet_trainer.datasets import DatasetError, Example, load_training_examples
from lorafleet_trainer.evaluate import split_validation
from lorafleet_trainer.manifest import JobManifest
from lorafleet_trainer.protocol import SPEC_FILE, EventWriter, WorkerEvent, WorkerSpec, read_spec

log = logging.getLogger("lorafleet_trainer.worker")


class JobFailed(RuntimeError):
    """A failure whose message is the reason the job reports, as is."""


def _resolve_model(spec: WorkerSpec, manifest: JobManifest) -> str:
    """A local folder (or a cached hub id) for the base model; JobFailed with a clear reason otherwise."""
    try:
        resolved = resolve_base_model(manifest.base_model, Path(spec.model_cache_dir), spec.s3.config())
    except Exception as exc:
        raise JobFailed(f"base model {manifest.base_model!r} could not be prepared: {exc}") from exc
    if Path(resolved).is_dir():
        return resolved
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(resolved, local_files_only=not spec.hub_download)
    except Exception as exc:
        where = "locally or on the hub" if spec.hub_download else "locally (hub downloads are off)"
        raise JobFailed(
            f"unknown base model {manifest.base_model!r}: not the embedded model, a local folder, an s3:// prefix "
            f"or a model found {where} ({type(exc).__name__})"
        ) from exc
    return resolved


def _drop_checkpoints(store: ObjectStore, job_id: str, events: EventWriter, reason: str) -> None:
    events.log(f"warning: not resuming from the checkpoint, training from the start: {reason}")
    discard_checkpoints(store, job_id)


def _find_checkpoint(
    store: ObjectStore, job_id: str, fingerprint: str, total: int, events: EventWriter
) -> Checkpoint | None:
    """The job's latest checkpoint when it can be resumed; otherwise None (any leftovers are deleted)."""
    try:
        checkpoint = load_latest_checkpoint(store, job_id)
    except CheckpointUnusable as exc:
        _drop_checkpoints(store, job_id, events, str(exc))
        return None
    if checkpoint is None:
        return None
    if checkpoint.fingerprint != fingerprint:
        reason = "it was made from other data or another manifest (dataset files changed?)"
        _drop_checkpoints(store, job_id, events, reason)
        return None
    if not 0 < checkpoint.loop.step < total:
        _drop_checkpoints(store, job_id, events, f"its step {checkpoint.loop.step} is outside 1..{total - 1}")
        return None
    return checkpoint


def _check_quantization(manifest: JobManifest) -> None:
    """Refuse a QLoRA job this machine cannot run before reading any dataset or model."""
    if manifest.lora.quantization == "none":
        return
    from lorafleet_trainer import train_loop

    problem = train_loop.quantization_problem(manifest.lora, train_loop.pick_device())
    if problem:
        raise JobFailed(problem)


def _load_rows(
    specs: list[Any], store: ObjectStore, spec: WorkerSpec, seed: int, events: EventWriter, what: str
) -> tuple[list[Example], list[Any]]:
    """Read and check ``what`` datasets; every bad row is logged with its file, row and field."""
    try:
        return load_training_examples(specs, store, spec.s3.config(), seed)
    except DatasetError as exc:
        for problem in exc.problems[:100]:
            events.log(problem)
        raise JobFailed(f"{what} data: {exc}" if what != "training" else str(exc)) from exc


def _validation_rows(
    manifest: JobManifest, examples: list[Example], store: ObjectStore, spec: WorkerSpec, events: EventWriter
) -> tuple[list[Example], list[Example]]:
    """(training rows, validation rows) as the manifest's ``validation`` section asks (none: no validation)."""
    validation = manifest.validation
    if validation is None:
        return examples, []
    if validation.split is not None:
        train, held = split_validation(examples, validation.split, manifest.training.seed)
        events.log(f"validation: {len(held)} of {len(examples)} training rows held out (split {validation.split})")
        return train, held
    assert validation.datasets is not None  # the manifest checks that one of the two is given
    held, reports = _load_rows(validation.datasets, store, spec, manifest.training.seed, events, "validation")
    for report in reports:
        events.log(f"validation dataset {report.uri}: {report.rows} rows, {report.used} used")
    return examples, held


def run_job(job_dir: Path, events: EventWriter) -> None:
    spec = read_spec(job_dir)
    (job_dir / SPEC_FILE).unlink(missing_ok=True)  # it holds the S3 secret: keep it on disk no longer than needed
    manifest = JobManifest.model_validate(spec.manifest)
    _check_quantization(manifest)
    store = open_store(spec.store_url, spec.s3.config())
    events.log(f"reading {len(manifest.datasets)} dataset(s)")
    examples, reports = _load_rows(manifest.datasets, store, spec, manifest.training.seed, events, "training")
    for report in reports:
        events.log(f"dataset {report.uri}: {report.rows} rows, {report.used} used (sha256 {report.sha256[:12]})")
    examples, validation_examples = _validation_rows(manifest, examples, store, spec, events)
    model_path = _resolve_model(spec, manifest)

    import torch
    from transformers import AutoTokenizer

    from lorafleet_trainer import train_loop
    from lorafleet_trainer.evaluate import eval_loss, evaluation_due
    from lorafleet_trainer.publish import build_metadata, save_adapter, write_training_log
    from lorafleet_trainer.tokenize import ChatTokenizer, TemplateError

    if spec.torch_threads > 0:
        torch.set_num_threads(spec.torch_threads)
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=not spec.hub_download)
    try:
        chat = ChatTokenizer(tokenizer)
    except TemplateError as exc:
        raise JobFailed(str(exc)) from exc
    encoded = chat.encode_all(examples, manifest.system_prompt, manifest.training.max_length)
    dropped = encoded.too_long + encoded.nothing_to_train
    if encoded.too_long:
        events.log(
            f"warning: dropped {encoded.too_long} of {len(examples)} rows longer than "
            f"training.max_length={manifest.training.max_length} tokens (longest {encoded.longest_dropped})"
        )
    if encoded.nothing_to_train:
        events.log(f"warning: dropped {encoded.nothing_to_train} rows with no trainable assistant turn")
    if not encoded.examples:
        raise JobFailed(f"no rows left to train on: all {len(examples)} rows were dropped (see the warnings)")
    held_out = chat.encode_all(validation_examples, manifest.system_prompt, manifest.training.max_length).examples
    if validation_examples and not held_out:
        raise JobFailed(
            f"no validation rows left: all {len(validation_examples)} were too long or had nothing to train"
        )
    if len(held_out) < len(validation_examples):
        events.log(f"warning: dropped {len(validation_examples) - len(held_out)} validation rows (too long or empty)")

    device = train_loop.pick_device()
    total = train_loop.total_steps([len(e.input_ids) for e in encoded.examples], manifest.training)
    fingerprint = data_fingerprint(
        manifest.model_dump(mode="json"),
        [r.sha256 for r in reports],
        [len(e.input_ids) for e in encoded.examples],
    )
    resume = _find_checkpoint(store, spec.job_id, fingerprint, total, events)
    where = f"cpu, {torch.get_num_threads()} threads" if device.type == "cpu" else device.type
    message = f"training on {len(encoded.examples)} rows for {total} optimizer steps ({where})"
    if resume is not None:
        message += f", resumed from the checkpoint at step {resume.loop.step}"
    start_step = resume.loop.step if resume is not None else 0
    events.emit(WorkerEvent(kind="state", state="RUNNING", total_steps=total, step=start_step, message=message))

    def fresh_model() -> Any:
        return train_loop.load_lora_model(
            model_path, manifest.lora, manifest.training.seed, device, local_only=not spec.hub_download
        )

    model = fresh_model()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    history: list[dict[str, float]] = []
    if resume is not None:
        try:
            restore_adapter(model, resume.adapter)
            history = resume.history
        except CheckpointUnusable as exc:
            _drop_checkpoints(store, spec.job_id, events, str(exc))
            resume = None

    every = manifest.validation.every_steps if manifest.validation is not None else 0

    def on_step(report: train_loop.StepReport) -> None:
        progress: dict[str, float] = {k: v for k, v in vars(report).items() if k != "trained_tokens"}
        if held_out and evaluation_due(report.step, report.total_steps, report.epoch, every):
            progress["eval_loss"] = eval_loss(model, held_out, manifest.training.batch_size, int(pad_id), device)
        history.append(progress | {"time": time.time()})
        events.emit(
            WorkerEvent(
                kind="progress",
                message=f"step {report.step}/{report.total_steps} loss {report.loss:.4f}"
                + (f" eval_loss {progress['eval_loss']:.4f}" if "eval_loss" in progress else ""),
                progress={k: float(v) for k, v in progress.items()},
                trained_tokens=report.trained_tokens,
            )
        )

    def on_checkpoint(state: LoopState) -> None:
        checkpoint = Checkpoint(state, adapter_weights(model), history, fingerprint)
        try:
            uri = save_checkpoint(store, spec.job_id, checkpoint, spec.checkpoint_keep)
        except (StoreError, OSError) as exc:  # a missed checkpoint costs only redone steps after a crash
            events.log(f"warning: the checkpoint at step {state.step} could not be saved: {exc}")
            return
        progress = {k: float(v) for k, v in history[-1].items() if k != "time"}
        events.emit(
            WorkerEvent(
                kind="checkpoint",
                step=state.step,
                checkpoint_uri=uri,
                progress=progress,
                message=f"checkpoint saved at step {state.step}/{total}",
            )
        )

    def run(resume_from: LoopState | None) -> train_loop.TrainSummary:
        return train_loop.train(
            model,
            encoded.examples,
            manifest.training,
            int(pad_id),
            on_step,
            device,
            resume=resume_from,
            on_checkpoint=on_checkpoint,
        )

    try:
        summary = run(resume.loop if resume is not None else None)
    except train_loop.ResumeMismatch as exc:  # nothing was trained yet: start over on a fresh adapter
        _drop_checkpoints(store, spec.job_id, events, str(exc))
        model, history = fresh_model(), []
        summary = run(None)
    folder = job_dir / "adapter"
    config = save_adapter(model, folder, spec.serving_max_lora_rank, manifest.base_model)
    write_training_log(folder, history)
    extra: dict[str, Any] = {
        "trained_tokens": summary.trained_tokens,
        "train_seconds": round(summary.seconds, 2),
        "device": summary.device,
        "training_rows": len(encoded.examples),
        "rows_dropped": dropped,
        "validation_rows": len(held_out),
        "eos_token": tokenizer.eos_token,
    }
    metadata = build_metadata(
        job_id=spec.job_id,
        manifest=manifest,
        config=config,
        folder=folder,
        final_loss=summary.final_loss,
        datasets=[r.as_metadata() for r in reports],
        extra=extra,
    )
    events.emit(WorkerEvent(kind="publishing", message=f"publishing {manifest.adapter_name}@{spec.job_id}"))
    uri = publish_adapter(store, folder, metadata)
    events.emit(
        WorkerEvent(
            kind="published",
            adapter_uri=uri,
            trained_tokens=summary.trained_tokens,
            message=f"published {manifest.adapter_name}@{spec.job_id} (final loss {summary.final_loss:.4f}, "
            f"{summary.seconds:.0f} s)",
        )
    )


def _event_stream() -> EventWriter:
    """Keep the real stdout for events; point fd 1 at stderr so stray prints land in the log."""
    events_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return EventWriter(os.fdopen(events_fd, "w", encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m lorafleet_trainer.worker <job-dir>", file=sys.stderr)
        return 2
    events = _event_stream()
    configure_logging("INFO", "trainer-worker")
    try:
        run_job(Path(args[0]), events)
    except JobFailed as exc:
        events.emit(WorkerEvent(kind="failed", error=str(exc)))
        return 1
    except Exception as exc:
        traceback.print_exc()
        events.emit(WorkerEvent(kind="failed", error=f"{type(exc).__name__}: {exc}"))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
