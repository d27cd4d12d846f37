"""Checkpoints and resume: the store layout, an exact resume of the real loop, and a trainer crash mid-job."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from lorafleet.trainer.v1 import trainer_pb2
from lorafleet_common.adapters import latest_key
from lorafleet_common.store import LocalStore
from lorafleet_gateway.fine_tuning.view import checkpoint_object
from lorafleet_trainer import train_loop
from lorafleet_trainer.checkpoint import (
    Checkpoint,
    CheckpointUnusable,
    LoopState,
    adapter_weights,
    checkpoint_due,
    discard_checkpoints,
    load_latest_checkpoint,
    restore_adapter,
    save_checkpoint,
)
from lorafleet_trainer.datasets import Example, Message
from lorafleet_trainer.launch import LocalWorker
from lorafleet_trainer.main import TrainerApp
from lorafleet_trainer.manifest import LoraSpec, TrainingSpec
from lorafleet_trainer.tokenize import ChatTokenizer, TokenizedExample

from .conftest import SEED_PAIRS, StartTrainer, seed_dataset, stub_for, tiny_manifest, watch_until_final

S = trainer_pb2
JOB = "job-ckpt"
# One torch thread: on a shared, loaded CI machine two spinning threads are several times slower than one.
ONE_THREAD = {"torch_threads": 1}


def _state(step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Checkpoint:
    planner = random.Random(step)
    loop = LoopState(
        step=step,
        epoch=1,
        group=step % 3,
        planner_state=planner.getstate(),
        plan_digest=f"digest-{step}",
        trained_tokens=100 * step,
        train_seconds=1.5 * step,
        optimizer=optimizer.state_dict(),
        torch_rng=torch.get_rng_state(),
    )
    history = [{"step": float(s), "loss": 1.0 / s} for s in range(1, step + 1)]
    return Checkpoint(loop, adapter_weights(module), history, "fingerprint")


def test_save_load_prune_and_the_pointer(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    assert load_latest_checkpoint(store, JOB) is None
    module = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    for step in (2, 4, 6):
        module(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        uri = save_checkpoint(store, JOB, _state(step, module, optimizer), keep=2)
    assert uri == store.uri(f"checkpoints/{JOB}/step-6")
    folders = {key.split("/")[2] for key in store.list(f"checkpoints/{JOB}")}
    assert folders == {"step-4", "step-6", "LATEST"}  # pruned to the newest two

    expected = _state(6, module, optimizer)
    loaded = load_latest_checkpoint(store, JOB)
    assert loaded is not None and loaded.uri == uri and loaded.fingerprint == "fingerprint"
    assert (loaded.loop.step, loaded.loop.epoch, loaded.loop.group, loaded.loop.trained_tokens) == (6, 1, 0, 600)
    assert loaded.loop.planner_state == expected.loop.planner_state  # random.Random.setstate accepts it
    assert loaded.loop.plan_digest == "digest-6" and loaded.history == expected.history
    assert torch.equal(loaded.loop.torch_rng, expected.loop.torch_rng) and loaded.loop.cuda_rng == []
    for name, tensor in expected.adapter.items():
        assert torch.equal(loaded.adapter[name], tensor)
    fresh = torch.nn.Linear(4, 3)
    restore_adapter(fresh, loaded.adapter)
    assert torch.equal(fresh.weight, module.weight)
    resumed = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    resumed.load_state_dict(loaded.loop.optimizer)
    assert torch.equal(resumed.state[fresh.weight]["exp_avg_sq"], optimizer.state[module.weight]["exp_avg_sq"])
    with pytest.raises(CheckpointUnusable, match="do not fit the model"):
        restore_adapter(torch.nn.Linear(4, 3, bias=False), loaded.adapter)

    # A save cut short before its pointer: its files exist, but the checkpoint is not there.
    store.put(f"checkpoints/{JOB}/step-8/adapter.safetensors", b"half")
    assert load_latest_checkpoint(store, JOB).loop.step == 6  # type: ignore[union-attr]
    save_checkpoint(store, JOB, _state(7, module, optimizer), keep=2)
    assert {key.split("/")[2] for key in store.list(f"checkpoints/{JOB}")} == {"step-6", "step-7", "LATEST"}
    # A pointer to files that are gone is reported, not half-read.
    store.delete(f"checkpoints/{JOB}/step-7/rng.pt")
    with pytest.raises(CheckpointUnusable, match="incomplete"):
        load_latest_checkpoint(store, JOB)
    assert discard_checkpoints(store, JOB) > 0 and store.list("checkpoints") == []


def test_checkpoint_cadence() -> None:
    assert [s for s in range(1, 11) if checkpoint_due(s, 4, 0, 0.0)] == [4, 8]
    assert not checkpoint_due(3, 0, 0, 1e9)  # both off
    assert checkpoint_due(3, 4, 1.0, 60.0) and not checkpoint_due(3, 4, 1.0, 59.0)


@pytest.fixture(scope="module")
def seed_examples(embedded_model_path: Path) -> tuple[list[TokenizedExample], int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path)
    rows = [Example((Message("user", q), Message("assistant", a)), "seed", i) for i, (q, a) in enumerate(SEED_PAIRS)]
    encoded = ChatTokenizer(tokenizer).encode_all(rows, "You are a helpful assistant.", 512)
    assert len(encoded.examples) == 8
    return encoded.examples[:4], int(tokenizer.pad_token_id)  # few rows: the test machine is slow


def test_the_loop_resumes_exactly(
    tmp_path: Path,
    embedded_model_path: Path,
    seed_examples: tuple[list[TokenizedExample], int],
    one_thread: None,
) -> None:
    """Uninterrupted vs. resumed from the end-of-epoch checkpoint: the same losses and weights (dropout on)."""
    examples, pad_id = seed_examples
    lora = LoraSpec(rank=4, alpha=8, dropout=0.1)
    training = TrainingSpec(
        epochs=2, batch_size=1, gradient_accumulation_steps=1, learning_rate=1e-3, checkpoint_every_steps=2
    )
    device = torch.device("cpu")
    store = LocalStore(tmp_path / "store")

    def fresh_model() -> Any:
        return train_loop.load_lora_model(str(embedded_model_path), lora, training.seed, device, local_only=True)

    model = fresh_model()
    losses: dict[int, float] = {}
    saved: list[int] = []

    def on_checkpoint(state: LoopState) -> None:
        history = [{"step": float(s), "loss": losses[s]} for s in sorted(losses)]
        save_checkpoint(store, JOB, Checkpoint(state, adapter_weights(model), history, "f"), keep=3)
        saved.append(state.step)

    def on_step(report: train_loop.StepReport) -> None:
        losses[report.step] = report.loss

    whole = train_loop.train(model, examples, training, pad_id, on_step, device, on_checkpoint=on_checkpoint)
    assert whole.steps == 8 and saved == [2, 4, 6]  # none after the last step
    reference, final_weights = dict(losses), {k: v.clone() for k, v in adapter_weights(model).items()}

    store.put(f"checkpoints/{JOB}/LATEST", b"step-4")  # the end of epoch 1: the next plan comes from the RNG
    checkpoint = load_latest_checkpoint(store, JOB)
    assert checkpoint is not None and checkpoint.loop.step == 4
    model = fresh_model()
    restore_adapter(model, checkpoint.adapter)
    losses.clear()
    resumed = train_loop.train(model, examples, training, pad_id, on_step, device, resume=checkpoint.loop)
    assert resumed.steps == 8 and sorted(losses) == [5, 6, 7, 8]
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step
    for name, tensor in adapter_weights(model).items():
        torch.testing.assert_close(tensor, final_weights[name], rtol=1e-5, atol=1e-7)

    # Other data (or another planner) under the same checkpoint is refused before any step is taken.
    with pytest.raises(train_loop.ResumeMismatch):
        train_loop.train(model, examples[:3], training, pad_id, on_step, device, resume=checkpoint.loop)


def _manifest(name: str) -> bytes:
    manifest = json.loads(
        tiny_manifest(name, "d.jsonl#4", epochs=2, batch_size=1, checkpoint_every_steps=2, checkpoint_every_minutes=0)
    )
    manifest["lora"]["dropout"] = 0.1  # the resumed run must continue the dropout RNG too
    return json.dumps(manifest).encode()


def _crash(app: TrainerApp) -> None:
    """What a trainer crash leaves behind: the worker killed, nothing recorded, no graceful shutdown."""
    scheduler = app.service.scheduler
    run = scheduler._current
    assert run is not None and isinstance(run.worker, LocalWorker)
    os.killpg(run.worker.pid, signal.SIGKILL)
    assert scheduler._task is not None
    scheduler._task.cancel()  # in the same breath: the supervisor never sees the worker's end
    app.service.accepting = False  # the fixture must not stop it gracefully either


def _losses(events: list[Any]) -> dict[int, float]:
    """Loss by step; a step trained again after a resume counts with its last value."""
    return {e.progress.step: e.progress.loss for e in events if e.kind == "progress"}


async def test_a_crashed_job_resumes_from_its_checkpoint(trainer_home: Path, start_trainer: StartTrainer) -> None:
    store = LocalStore(trainer_home / "store")
    store.put("d.jsonl", seed_dataset())
    store.put("m.json", _manifest("resumable"))
    first = await start_trainer(trainer_home, **ONE_THREAD)
    channel, stub = stub_for(first)
    checkpointed = 0
    async with channel:
        await stub.CreateJob(S.CreateJobRequest(manifest_uri="m.json", job_id="crash"))
        async for event in stub.WatchJob(S.WatchJobRequest(job_id="crash"), timeout=300):
            if event.kind == "checkpoint":
                checkpointed = event.progress.step
            elif event.kind == "progress" and checkpointed and event.progress.step > checkpointed:
                _crash(first)  # a step after the checkpoint is done: it will be trained again
                break
            assert event.state != S.JOB_STATE_SUCCEEDED, "the job ended before the crash"
    await asyncio.gather(first.service.scheduler._task, return_exceptions=True)  # type: ignore[arg-type]
    await first.grpc.stop(0)
    first.jobs.close()
    resumed_from = int(store.get("checkpoints/crash/LATEST").decode().removeprefix("step-"))
    assert resumed_from >= checkpointed > 0

    second = await start_trainer(trainer_home, **ONE_THREAD)
    channel, stub = stub_for(second)
    async with channel:
        events = await watch_until_final(stub, "crash")
        assert events[-1].kind == "published" and events[-1].state == S.JOB_STATE_SUCCEEDED
        assert store.get(latest_key("resumable")) == b"crash"
        requeued = [e.message for e in events].index("re-queued: the trainer restarted while the job was running")
        after = events[requeued:]
        [running] = [e for e in after if e.kind == "state" and e.state == S.JOB_STATE_RUNNING]
        assert f"resumed from the checkpoint at step {resumed_from}" in running.message
        assert "://" not in running.message  # tenants see job messages: no store URIs
        assert [e.progress.step for e in after if e.kind == "progress"] == list(range(resumed_from + 1, 9))
        checkpoints = [e for e in events if e.kind == "checkpoint"]
        assert {c.progress.step for c in checkpoints} <= {2, 4, 6}  # every 2 steps, none after the last
        assert {c.progress.step for c in after if c.kind == "checkpoint"} == {s for s in (2, 4, 6) if s > resumed_from}
        assert all(c.progress.loss > 0 and c.message.startswith("checkpoint saved at step") for c in checkpoints)
        listed = checkpoint_object(checkpoints[-1], "resumable")  # what GET .../checkpoints shows
        assert listed["step_number"] == checkpoints[-1].progress.step and listed["metrics"]["train_loss"] > 0
        # Removed once the adapter is published. A watcher reads the final event from the database, which may be
        # a moment before the scheduler has finished deleting: wait for it, boundedly.
        for _ in range(100):
            if not store.list("checkpoints/crash"):
                break
            await asyncio.sleep(0.1)
        assert store.list("checkpoints/crash") == []

        # The same job, never interrupted: the same loss at every step, before and after the resume.
        store.put("ref.json", _manifest("reference"))
        await stub.CreateJob(S.CreateJobRequest(manifest_uri="ref.json", job_id="reference"))
        reference = _losses(await watch_until_final(stub, "reference"))
    resumed = _losses(events)
    assert sorted(resumed) == sorted(reference) == list(range(1, 9))
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], rel=0.01), step
    job = second.jobs.get("crash")
    assert job.step == 8 and job.loss == pytest.approx(reference[8], rel=0.01)


async def test_cancelling_a_job_removes_its_checkpoints(trainer_home: Path, start_trainer: StartTrainer) -> None:
    app = await start_trainer(trainer_home, **ONE_THREAD)
    store = LocalStore(trainer_home / "store")
    store.put("d.jsonl", seed_dataset())
    store.put("long.json", tiny_manifest("long", "d.jsonl#4", epochs=200, batch_size=1, checkpoint_every_steps=1))
    channel, stub = stub_for(app)
    async with channel:
        await stub.CreateJob(S.CreateJobRequest(manifest_uri="long.json", job_id="long"))
        async for event in stub.WatchJob(S.WatchJobRequest(job_id="long"), timeout=240):
            if event.kind == "checkpoint":
                break
        assert store.exists("checkpoints/long/LATEST")
        cancelled = await stub.CancelJob(S.CancelJobRequest(job_id="long"), timeout=60)
    assert cancelled.state == S.JOB_STATE_CANCELLED
    assert store.list("checkpoints/long") == [] and store.list("adapters") == []
