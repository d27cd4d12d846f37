"""A job's inputs, checked before any training: the device count, the datasets, the base model, the tokens.

Every problem is a ``JobFailed`` whose message is the reason the job reports, as is. In a data parallel
job every rank runs these (the same verdict everywhere); worker.py makes the ranks agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet_common.embedded_model import resolve_base_model
from lorafleet_common.store import ObjectStore
from lorafleet_trainer.datasets import DatasetError, Example, load_training_examples
from lorafleet_trainer.distributed import Ranks, devices_problem, usable_cpus
from lorafleet_trainer.evaluate import split_validation
from lorafleet_trainer.manifest import JobManifest
from lorafleet_trainer.protocol import EventWriter, WorkerSpec


class JobFailed(RuntimeError):
    """A failure whose message is the reason the job reports, as is."""


def resolve_model(spec: WorkerSpec, manifest: JobManifest) -> str:
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


def check_quantization(manifest: JobManifest) -> None:
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


@dataclass
class TrainingRows:
    """The job's rows, checked and tokenized: the same on every rank."""

    examples: list[Any]  # TokenizedExample
    held_out: list[Any]  # TokenizedExample
    reports: list[Any]  # datasets.DatasetReport
    dropped: int
    pad_id: int
    eos_token: str


def check_devices(manifest: JobManifest, ranks: Ranks) -> None:
    """Refuse a device count this host cannot give before anything is read; the same verdict on every rank."""
    devices = manifest.resources.devices
    if devices == 1 and not ranks.distributed:
        return  # nothing to check, and torch is not imported yet: a bad dataset fails fast
    import torch

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    problem = devices_problem(devices, ranks.world_size, cuda, usable_cpus())
    if problem:
        raise JobFailed(problem)


def read_rows(
    manifest: JobManifest, store: ObjectStore, spec: WorkerSpec, events: EventWriter
) -> tuple[list[Example], list[Example], list[Any]]:
    """(training rows, validation rows, dataset reports), every row checked."""
    events.log(f"reading {len(manifest.datasets)} dataset(s)")
    examples, reports = _load_rows(manifest.datasets, store, spec, manifest.training.seed, events, "training")
    for report in reports:
        events.log(f"dataset {report.uri}: {report.rows} rows, {report.used} used (sha256 {report.sha256[:12]})")
    examples, validation_examples = _validation_rows(manifest, examples, store, spec, events)
    return examples, validation_examples, reports


def tokenize_rows(
    manifest: JobManifest,
    model_path: str,
    spec: WorkerSpec,
    rows: tuple[list[Example], list[Example], list[Any]],
    events: EventWriter,
) -> TrainingRows:
    """Render every row with the base model's chat template; rows that cannot train are dropped and counted."""
    from transformers import AutoTokenizer

    from lorafleet_trainer.tokenize import ChatTokenizer, TemplateError

    examples, validation_examples, reports = rows
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=not spec.hub_download)
    try:
        chat = ChatTokenizer(tokenizer)
    except TemplateError as exc:
        raise JobFailed(str(exc)) from exc
    encoded = chat.encode_all(examples, manifest.system_prompt, manifest.training.max_length)
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
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dropped = encoded.too_long + encoded.nothing_to_train
    return TrainingRows(encoded.examples, held_out, reports, dropped, int(pad_id), str(tokenizer.eos_token))
