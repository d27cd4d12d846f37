"""Jobs with resources.devices: 2 through a real trainer (gRPC, LocalLauncher, torchrun, 2 gloo ranks on a CPU):
the same losses and adapter as one process, one event stream, cancel stops every rank.

Also: every rank stops when the job's process group is signalled (SIGTERM through torchrun, SIGKILL through
each rank's parent-death signal), and a device count the host cannot give fails the job at validation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
import torch
from safetensors.torch import load as load_safetensors

from lorafleet.trainer.v1 import trainer_pb2
from lorafleet_common.adapters import WEIGHTS_FILE, latest_key, read_metadata, version_prefix
from lorafleet_common.store import LocalStore
from lorafleet_trainer.launch import LocalLauncher, LocalWorker
from lorafleet_trainer.main import TrainerApp
from lorafleet_trainer.protocol import LOG_FILE, S3Settings, WorkerSpec

from .conftest import StartTrainer, seed_dataset, stub_for, tiny_manifest, watch_until_final

S = trainer_pb2
pytestmark = pytest.mark.timeout(300)
ONE_THREAD = {"torch_threads": 1}  # per rank: 2 ranks on the test machine's 2 cores


def _manifest(name: str, devices: int, **training: Any) -> bytes:
    manifest = json.loads(tiny_manifest(name, "d.jsonl#4", batch_size=1, **training))
    return json.dumps(manifest | {"resources": {"devices": devices}}).encode()


def _ranks(worker: LocalWorker) -> list[psutil.Process]:
    """The worker ranks torchrun started (in sessions of their own), found from torchrun's pid."""
    children = psutil.Process(worker.pid).children(recursive=True)
    return [
        p
        for p in children
        if "lorafleet_trainer.worker" in " ".join(p.cmdline()) or "rank_that_waits" in " ".join(p.cmdline())
    ]


def _running_worker(app: TrainerApp) -> LocalWorker:
    run = app.service.scheduler._current
    assert run is not None and isinstance(run.worker, LocalWorker)
    return run.worker


def _published_weights(store: LocalStore, name: str, version: str) -> torch.Tensor:
    """Every LoRA weight of a published adapter, flattened in name order."""
    weights = load_safetensors(store.get(f"{version_prefix(name, version)}/{WEIGHTS_FILE}"))
    return torch.cat([weights[key].reshape(-1).float() for key in sorted(weights)])


async def test_two_ranks_train_what_one_process_trains(trainer_home: Path, start_trainer: StartTrainer) -> None:
    """The same rows and manifest with resources.devices 1 and 2: the same loss at every step, the same adapter.

    4 rows, 3 micro-batches a step: steps of 3 and 1 micro-batches; with 2 ranks rank 0 takes 2 and then 1,
    rank 1 takes 1 and then none. LoRA dropout is 0 (each rank draws its own masks).
    """
    store = LocalStore(trainer_home / "store")
    store.put("d.jsonl", seed_dataset())
    training = {"gradient_accumulation_steps": 3, "checkpoint_every_steps": 1, "checkpoint_every_minutes": 0}
    store.put("one.json", _manifest("one", 1, **training))
    store.put("two.json", _manifest("two", 2, **training))
    app = await start_trainer(trainer_home, **ONE_THREAD)
    channel, stub = stub_for(app)
    async with channel:
        await stub.CreateJob(S.CreateJobRequest(manifest_uri="one.json", job_id="one"))
        await stub.CreateJob(S.CreateJobRequest(manifest_uri="two.json", job_id="two"))
        single = await watch_until_final(stub, "one")
        events = await watch_until_final(stub, "two")
    assert single[-1].kind == "published" and events[-1].kind == "published", (single[-1], events[-1])
    assert events[-1].state == S.JOB_STATE_SUCCEEDED and sum(e.kind == "published" for e in events) == 1
    [running] = [e for e in events if e.kind == "state" and e.state == S.JOB_STATE_RUNNING]
    assert "2 processes, data parallel over gloo" in running.message
    progress = [e.progress for e in events if e.kind == "progress"]
    assert [p.step for p in progress] == [1, 2]  # one event per step, not one per rank
    assert all(p.tokens_per_second > 0 and p.peak_memory_bytes > 0 for p in progress)
    assert [e.progress.step for e in events if e.kind == "checkpoint"] == [1]  # rank 0 alone saves
    assert len([e for e in events if e.kind == "log" and e.message.startswith("dataset ")]) == 1  # rank 1 is quiet

    reference = [e.progress for e in single if e.kind == "progress"]
    for got, expected in zip(progress, reference, strict=True):
        assert got.loss == pytest.approx(expected.loss, rel=1e-5), got.step
    # The adapters: within 1e-4 as a whole (the norm of the difference over every LoRA weight), and element by
    # element nearly everywhere. Only the gradients' summation order differs, but AdamW divides by sqrt(v), so
    # a gradient element near 0 turns that rounding into a visible step of the odd element. Without the
    # gradient all-reduce the difference is of the order of the weights themselves.
    expected_weights, weights = _published_weights(store, "one", "one"), _published_weights(store, "two", "two")
    assert torch.linalg.vector_norm(weights - expected_weights) <= 1e-4 * torch.linalg.vector_norm(expected_weights)
    close = torch.isclose(weights, expected_weights, rtol=1e-4, atol=1e-6).float().mean()
    assert close >= 0.999, f"{(1 - close) * 100:.3f}% of the LoRA weights differ"

    assert store.get(latest_key("two")) == b"two"
    assert read_metadata(store, "two", "two").model_dump()["devices"] == 2
    log = (app.settings.resolved_work_dir() / "two" / LOG_FILE).read_text()
    assert "rank 0 of 2: data parallel on cpu (gloo)" in log and "rank 1 of 2: data parallel on cpu (gloo)" in log


async def test_cancelling_a_two_device_job_stops_every_rank(trainer_home: Path, start_trainer: StartTrainer) -> None:
    store = LocalStore(trainer_home / "store")
    store.put("d.jsonl", seed_dataset())
    store.put("long.json", _manifest("long", 2, epochs=200, gradient_accumulation_steps=2))
    app = await start_trainer(trainer_home, **ONE_THREAD)
    channel, stub = stub_for(app)
    async with channel:
        await stub.CreateJob(S.CreateJobRequest(manifest_uri="long.json", job_id="long"))
        async for event in stub.WatchJob(S.WatchJobRequest(job_id="long"), timeout=240):
            if event.state == S.JOB_STATE_RUNNING:  # both ranks are up: they agreed on the data
                break
        worker = _running_worker(app)
        torchrun = psutil.Process(worker.pid)
        ranks = _ranks(worker)
        try:
            assert len(ranks) == 2
            # torchrun starts each rank in a session of its own: the job's process group holds torchrun only.
            assert all(os.getsid(r.pid) != os.getsid(torchrun.pid) for r in ranks)
            cancelled = await stub.CancelJob(S.CancelJobRequest(job_id="long"), timeout=60)
            assert cancelled.state == S.JOB_STATE_CANCELLED
            _, alive = psutil.wait_procs([torchrun, *ranks], timeout=10)
            assert alive == [], f"still running after the cancel: {alive}"
        finally:
            for process in (torchrun, *ranks):  # a failed check must not leave them behind
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
    assert store.list("adapters") == []


def _waiting_ranks_spec(tmp_path: Path) -> WorkerSpec:
    manifest = json.loads(_manifest("unused", 2))
    s3 = S3Settings(endpoint="", access_key="", secret_key="", secure=False, region=None, timeout_s=1)
    return WorkerSpec(job_id="j", manifest=manifest, store_url=str(tmp_path), s3=s3, model_cache_dir=str(tmp_path))


class WaitingRanksLauncher(LocalLauncher):
    """The LocalLauncher's torchrun command, running ranks that only wait to be stopped."""

    def command(self, spec: WorkerSpec, job_dir: Path) -> list[str]:
        command = super().command(spec, job_dir)
        assert command[-3:-1] == ["-m", "lorafleet_trainer.worker"]
        return [*command[:-3], str(Path(__file__).with_name("rank_that_waits.py"))]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
async def test_a_signal_to_the_job_process_group_stops_every_rank(tmp_path: Path, sig: signal.Signals) -> None:
    worker = await WaitingRanksLauncher().launch(_waiting_ranks_spec(tmp_path), tmp_path / "job")
    assert isinstance(worker, LocalWorker)
    ranks: list[psutil.Process] = []
    try:
        log = tmp_path / "job" / LOG_FILE
        for _ in range(600):
            if log.exists() and log.read_text().count("waiting") == 2:
                break
            await asyncio.sleep(0.1)
        ranks = _ranks(worker)
        assert len(ranks) == 2, log.read_text()
        await worker.signal(sig)
        await asyncio.wait_for(worker.wait(), 30)
        _, alive = psutil.wait_procs(ranks, timeout=10)
        assert alive == [], f"{sig.name}: ranks still running: {alive}"
    finally:
        worker.kill_now()
        for rank in ranks:  # a failed check must not leave them behind
            with contextlib.suppress(psutil.NoSuchProcess):
                rank.kill()
        await worker.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU host's limit (a CUDA host counts its GPUs)")
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
async def test_more_devices_than_the_host_has_fail_at_validation(
    trainer_home: Path, start_trainer: StartTrainer
) -> None:
    store = LocalStore(trainer_home / "store")
    store.put("d.jsonl", seed_dataset())
    store.put("two.json", _manifest("two", 2))
    store.put("none.json", _manifest("none", 0))
    app = await start_trainer(trainer_home, **ONE_THREAD)
    channel, stub = stub_for(app)
    # The trainer may use one CPU (its workers inherit the affinity): 2 processes are one too many, on any
    # machine, and only 2 ranks start to find it out.
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(affinity)})
    try:
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.CreateJob(S.CreateJobRequest(manifest_uri="none.json"))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "resources.devices: must be >= 1" in (refused.value.details() or "")
            await stub.CreateJob(S.CreateJobRequest(manifest_uri="two.json", job_id="two"))
            events = await watch_until_final(stub, "two")
    finally:
        os.sched_setaffinity(0, affinity)
    assert events[-1].state == S.JOB_STATE_FAILED
    assert [e.state for e in events if e.kind == "state"][-2:] == [S.JOB_STATE_VALIDATING, S.JOB_STATE_FAILED]
    assert app.jobs.get("two").error == (
        "resources.devices: 2 processes asked for, but this trainer host has no CUDA GPU and 1 CPU(s): "
        "on a CPU each process needs one"
    )
    assert store.list("adapters") == []
