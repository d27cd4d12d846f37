"""One training job, in its own process: ``python -m lorafleet_trainer.worker <job-dir>``.

Reads ``<job-dir>/spec.json``, checks the datasets and the base model
(VALIDATING, job_inputs.py), trains (RUNNING), saves and publishes the adapter, and reports
each step as a JSON line on stdout. Anything else the libraries print goes to
stderr (the job's log), so it cannot corrupt the event stream.

A job with ``resources.devices: N > 1`` runs as N copies of this process under torchrun
(distributed.py): each rank goes through the same phases; a phase that fails on one rank fails on
all with its reason, and rank 0 alone decides on resuming, reports, checkpoints and publishes.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

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
from lorafleet_trainer.distributed import Ranks, die_with_parent, usable_cpus
from lorafleet_trainer.job_inputs import (
    JobFailed,
    TrainingRows,
    check_devices,
    check_quantization,
    read_rows,
    resolve_model,
    tokenize_rows,
)
from lorafleet_trainer.manifest import JobManifest
from lorafleet_trainer.protocol import SPEC_FILE, EventWriter, WorkerEvent, WorkerSpec, read_spec

log = logging.getLogger("lorafleet_trainer.worker")

T = TypeVar("T")


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


def _attempt(phase: Callable[[], T]) -> tuple[Any, str | None]:
    """(result, None), or (None, the job's failure reason): a JobFailed's message, or the exception named."""
    try:
        return phase(), None
    except JobFailed as exc:
        return None, str(exc)
    except Exception as exc:
        traceback.print_exc()
        return None, f"{type(exc).__name__}: {exc}"


def _together(ranks: Ranks, phase: Callable[[], T]) -> T:
    """Run a phase on every rank; if it fails on any, it fails on all with the first failing rank's reason
    (a rank must never wait in a collective for one that gave up)."""
    result, error = _attempt(phase)
    error = ranks.first_error(error)
    if error is not None:
        raise JobFailed(error)
    return result


def _main_decides(ranks: Ranks, decide: Callable[[], T]) -> T:
    """Rank 0 runs ``decide`` (it may touch the store and emit events); every rank gets its result or failure."""
    outcome: tuple[Any, str | None] = _attempt(decide) if ranks.is_main else (None, None)
    result, error = ranks.from_main(outcome)
    if error is not None:
        raise JobFailed(error)
    return result


def _main_first(ranks: Ranks, phase: Callable[[], T]) -> T:
    """Rank 0 runs ``phase`` first (it fills a shared cache, e.g. the base model's), then the other ranks."""
    first = _main_decides(ranks, phase)
    if not ranks.distributed:
        return first
    return _together(ranks, (lambda: first) if ranks.is_main else phase)


def _share_warning(manifest: JobManifest, ranks: Ranks) -> str | None:
    per_step, n = manifest.training.gradient_accumulation_steps, ranks.world_size
    if not ranks.distributed or per_step % n == 0:
        return None
    return (
        f"warning: each optimizer step's {per_step} micro-batch(es) are dealt to {n} processes unevenly, so some "
        f"wait in every step: set training.gradient_accumulation_steps to a multiple of {n} to keep all busy"
    )


def run_job(job_dir: Path, events: EventWriter, ranks: Ranks) -> None:
    spec = read_spec(job_dir)
    manifest = JobManifest.model_validate(spec.manifest)
    check_devices(manifest, ranks)
    check_quantization(manifest)
    device, backend = None, ""
    if ranks.distributed:  # every rank has read the spec once they have all joined
        from lorafleet_trainer import train_loop

        device = ranks.device(train_loop.pick_device())
        backend = ranks.start(device)
        log.info("%s: data parallel on %s (%s), pid %d", ranks, device, backend, os.getpid())
    (job_dir / SPEC_FILE).unlink(missing_ok=True)  # it holds the S3 secret: keep it on disk no longer than needed
    store = open_store(spec.store_url, spec.s3.config())
    rows = _together(ranks, lambda: read_rows(manifest, store, spec, events))
    model_path = _main_first(ranks, lambda: resolve_model(spec, manifest))

    import torch

    from lorafleet_trainer import train_loop

    device = device or train_loop.pick_device()
    if spec.torch_threads > 0:
        torch.set_num_threads(spec.torch_threads)
    elif ranks.distributed and device.type == "cpu":  # the ranks share the cores
        torch.set_num_threads(max(1, usable_cpus() // ranks.world_size))
    data = _together(ranks, lambda: tokenize_rows(manifest, model_path, spec, rows, events))
    if ranks.is_main and (warning := _share_warning(manifest, ranks)):
        events.log(warning)
    _train_and_publish(job_dir, spec, manifest, store, model_path, data, device, events, ranks, backend)


def _train_and_publish(
    job_dir: Path,
    spec: WorkerSpec,
    manifest: JobManifest,
    store: ObjectStore,
    model_path: str,
    data: TrainingRows,
    device: Any,
    events: EventWriter,
    ranks: Ranks,
    backend: str,
) -> None:
    import torch

    from lorafleet_trainer import train_loop
    from lorafleet_trainer.evaluate import eval_loss, evaluation_due
    from lorafleet_trainer.publish import (
        PublishFailed,
        build_metadata,
        publish_with_retry,
        save_adapter,
        write_training_log,
    )

    lengths = [len(e.input_ids) for e in data.examples]
    total = train_loop.total_steps(lengths, manifest.training)
    fingerprint = data_fingerprint(manifest.model_dump(mode="json"), [r.sha256 for r in data.reports], lengths)
    resume = _main_decides(ranks, lambda: _find_checkpoint(store, spec.job_id, fingerprint, total, events))
    where = f"cpu, {torch.get_num_threads()} threads" if device.type == "cpu" else device.type
    if ranks.distributed:
        where += f", {ranks.world_size} processes, data parallel over {backend}"
    message = f"training on {len(data.examples)} rows for {total} optimizer steps ({where})"
    if resume is not None:
        message += f", resumed from the checkpoint at step {resume.loop.step}"
    start_step = resume.loop.step if resume is not None else 0
    events.emit(WorkerEvent(kind="state", state="RUNNING", total_steps=total, step=start_step, message=message))

    def fresh_model() -> Any:
        return train_loop.load_lora_model(
            model_path, manifest.lora, manifest.training.seed, device, local_only=not spec.hub_download
        )

    def drop_checkpoints(reason: str) -> None:
        if ranks.is_main:  # every rank comes here (the same verdict); one deletes
            _drop_checkpoints(store, spec.job_id, events, reason)

    model = fresh_model()
    history: list[dict[str, float]] = []
    if resume is not None:
        try:
            restore_adapter(model, resume.adapter)
            history = resume.history
        except CheckpointUnusable as exc:
            drop_checkpoints(str(exc))
            resume = None

    every = manifest.validation.every_steps if manifest.validation is not None else 0

    def on_step(report: train_loop.StepReport) -> None:
        progress: dict[str, float] = {k: v for k, v in vars(report).items() if k != "trained_tokens"}
        if data.held_out and evaluation_due(report.step, report.total_steps, report.epoch, every):
            progress["eval_loss"] = eval_loss(model, data.held_out, manifest.training.batch_size, data.pad_id, device)
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
            data.examples,
            manifest.training,
            data.pad_id,
            on_step,
            device,
            resume=resume_from,
            on_checkpoint=on_checkpoint,
            ranks=ranks,
            on_note=events.log,
        )

    try:
        summary = run(resume.loop if resume is not None else None)
    except train_loop.ResumeMismatch as exc:  # nothing was trained yet: start over on a fresh adapter
        drop_checkpoints(str(exc))
        model, history = fresh_model(), []
        summary = run(None)
    if not ranks.is_main:
        return  # rank 0 holds the same weights and publishes them
    folder = job_dir / "adapter"
    config = save_adapter(model, folder, spec.serving_max_lora_rank, manifest.base_model)
    write_training_log(folder, history)
    extra: dict[str, Any] = {
        "trained_tokens": summary.trained_tokens,
        "train_seconds": round(summary.seconds, 2),
        "device": summary.device,
        "gradient_checkpointing": summary.gradient_checkpointing,
        "devices": ranks.world_size,
        "training_rows": len(data.examples),
        "rows_dropped": data.dropped,
        "validation_rows": len(data.held_out),
        "eos_token": data.eos_token,
    }
    metadata = build_metadata(
        job_id=spec.job_id,
        manifest=manifest,
        config=config,
        folder=folder,
        final_loss=summary.final_loss,
        datasets=[r.as_metadata() for r in data.reports],
        extra=extra,
    )
    events.emit(WorkerEvent(kind="publishing", message=f"publishing {manifest.adapter_name}@{spec.job_id}"))
    try:
        uri = publish_with_retry(store, folder, metadata, events.log)
    except PublishFailed as exc:
        raise JobFailed(str(exc)) from exc
    events.emit(
        WorkerEvent(
            kind="published",
            adapter_uri=uri,
            trained_tokens=summary.trained_tokens,
            message=f"published {manifest.adapter_name}@{spec.job_id} (final loss {summary.final_loss:.4f}, "
            f"{summary.seconds:.0f} s)",
        )
    )


def _event_stream(ranks: Ranks) -> EventWriter:
    """Keep the real stdout for events; point fd 1 at stderr so stray prints land in the log.

    Under torchrun every rank shares the job's stdout: only rank 0 reports, the others' events go nowhere.
    """
    events_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if not ranks.is_main:
        os.close(events_fd)
        return EventWriter(open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115 (lives as long as the process)
    return EventWriter(os.fdopen(events_fd, "w", encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m lorafleet_trainer.worker <job-dir>", file=sys.stderr)
        return 2
    ranks = Ranks.from_environment()
    if ranks.distributed:
        die_with_parent()
    events = _event_stream(ranks)
    configure_logging("INFO", "trainer-worker" if not ranks.distributed else f"trainer-worker[{ranks.rank}]")
    try:
        run_job(Path(args[0]), events, ranks)
    except JobFailed as exc:
        if not ranks.is_main:  # every rank has the same verdict; rank 0 reports it (and exits 1 for the job)
            log.info("%s: stopping, the job failed: %s", ranks, exc)
            return 0
        events.emit(WorkerEvent(kind="failed", error=str(exc)))
        return 1
    except Exception as exc:
        traceback.print_exc()
        reason = f"{type(exc).__name__}: {exc}"
        if ranks.distributed:
            reason += f" (on {ranks}; the job's worker log has every rank's output)"
        events.emit(WorkerEvent(kind="failed", error=reason))
        return 1
    finally:
        ranks.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
