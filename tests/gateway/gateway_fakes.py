"""Scripted upstreams for the gateway's component tests: real grpc.aio servers on loopback ports
implementing the generated servicers (InferenceService + grpc.health.v1, TrainerService)."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from lorafleet.inference.v1 import inference_pb2, inference_pb2_grpc
from lorafleet.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from lorafleet_common.adapters import AdapterMetadata, publish_adapter
from lorafleet_common.store import LocalStore, ObjectNotFound

# Errors a FakeInference can be told to answer before its first chunk.
ABORTS = {
    "unavailable": (grpc.StatusCode.UNAVAILABLE, "replica is draining"),
    "not_found": (grpc.StatusCode.NOT_FOUND, "adapter not found in the store"),
    "exhausted": (grpc.StatusCode.RESOURCE_EXHAUSTED, "engine queue is full"),
    "rejected": (grpc.StatusCode.FAILED_PRECONDITION, "LoRA rank 64 exceeds this server's max_lora_rank 8"),
    "invalid": (grpc.StatusCode.INVALID_ARGUMENT, "max_tokens exceeds the context window"),
}


def prompt_tokens(request: inference_pb2.GenerateRequest) -> int:
    """The fake's tokenizer: whitespace words of the prompt or of every message."""
    if request.WhichOneof("input") == "prompt":
        return len(request.prompt.split())
    return sum(len(m.content.split()) + 1 for m in request.chat.messages)  # +1: the role marker


def reply_tokens(request: inference_pb2.GenerateRequest, index: int) -> list[str]:
    """Deterministic reply of choice ``index``; names the adapter so tests can see it was applied."""
    who = request.adapter.partition("@")[0] or "base"
    return ["Hello", " from", f" {who}", f" choice{index}", ".", " Bye", "!"]


@dataclass
class FakeInference(inference_pb2_grpc.InferenceServiceServicer):
    """Streams reply_tokens one token per chunk; honours n, max_tokens, stop and logprobs.

    ``mode``: "ok", one of ABORTS (fail before the first chunk) or "fail_midstream"
    (INTERNAL after two chunks). ``delay_s`` sleeps before each chunk. Like the real
    replica it "loads" every adapter it serves and reports it, with its load, in Stats.

    With ``merge_capable`` it implements MergeAdapter as the real replica does:
    drain, switch (``merge_delay_s``), then serve the merged adapter only. While
    switching it holds the requests its new mode will serve until the switch
    ends; switching or merged, it refuses the others with FAILED_PRECONDITION,
    and switches of a merge held less than ``min_hold_s`` unless forced.
    """

    name: str
    mode: str = "ok"
    delay_s: float = 0.0
    requests: list[inference_pb2.GenerateRequest] = field(default_factory=list)
    # Shared by the replicas of one stack: every request in arrival order.
    journal: list[inference_pb2.GenerateRequest] = field(default_factory=list)
    cancelled: int = 0
    health: Any = None
    port: int = 0
    running: int = 0
    loaded: set[str] = field(default_factory=set)
    unloaded: list[str] = field(default_factory=list)
    merge_capable: bool = False
    merge_state: int = inference_pb2.MERGE_STATE_LORA
    merged: str = ""  # "name@version" merged (or being merged)
    merged_at: float = 0.0
    merge_delay_s: float = 0.0
    min_hold_s: float = 0.0
    merge_calls: list[str] = field(default_factory=list)

    def reset(self) -> None:
        self.mode, self.delay_s, self.cancelled = "ok", 0.0, 0
        self.merge_capable, self.merge_delay_s, self.min_hold_s = False, 0.0, 0.0
        self.merge_now("")
        self.merge_calls.clear()
        self.requests.clear()
        self.journal.clear()
        self.loaded.clear()
        self.unloaded.clear()

    async def Stats(self, request: inference_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        merged_for_s = time.monotonic() - self.merged_at if self.merge_state == inference_pb2.MERGE_STATE_MERGED else 0
        return inference_pb2.StatsResponse(
            running=self.running,
            loaded_adapters=sorted(self.loaded),
            merge_capable=self.merge_capable,
            merged_adapter=self.merged,
            merge_state=self.merge_state,
            merged_for_s=merged_for_s,
        )

    def merge_now(self, adapter: str) -> None:
        """Switch mode at once, behind the gateway's back (as another gateway's planner would)."""
        self.merged, self.merged_at = adapter, time.monotonic()
        self.merge_state = inference_pb2.MERGE_STATE_MERGED if adapter else inference_pb2.MERGE_STATE_LORA

    async def MergeAdapter(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        self.merge_calls.append(request.adapter)
        if not self.merge_capable:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this replica cannot merge adapters")
        if request.adapter == self.merged and self.merge_state in (
            inference_pb2.MERGE_STATE_MERGED,
            inference_pb2.MERGE_STATE_LORA,
        ):
            return inference_pb2.MergeAdapterResponse(merged_adapter=self.merged, changed=False)
        held = time.monotonic() - self.merged_at
        if self.merge_state == inference_pb2.MERGE_STATE_MERGED and held < self.min_hold_s and not request.force:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"merged {held:.0f}s ago; minimum hold not over")
        if request.adapter:
            name, _, version = request.adapter.partition("@")
            target = f"{name}@{version or 'latest'}"
            self.merge_state = inference_pb2.MERGE_STATE_MERGING
        else:
            target = ""
            self.merge_state = inference_pb2.MERGE_STATE_UNMERGING
        self.merged = target
        started = time.monotonic()
        while self.running:  # drain
            await asyncio.sleep(0.01)
        drained = time.monotonic()
        await asyncio.sleep(self.merge_delay_s)
        self.merge_now(target)
        return inference_pb2.MergeAdapterResponse(
            merged_adapter=target, changed=True, drain_s=drained - started, merge_s=time.monotonic() - drained
        )

    def _is_merged(self, adapter: str) -> bool:
        return bool(adapter) and adapter in (self.merged, self.merged.partition("@")[0])

    async def _refusal(self, adapter: str) -> str | None:
        """None when the current mode (after waiting out a switch that will serve it) serves ``adapter``."""
        while self.merge_state in (inference_pb2.MERGE_STATE_MERGING, inference_pb2.MERGE_STATE_UNMERGING):
            if self.merge_state == inference_pb2.MERGE_STATE_MERGING and not self._is_merged(adapter):
                return f"replica is switching to merged mode for {self.merged}"
            await asyncio.sleep(0.01)
        if self.merge_state == inference_pb2.MERGE_STATE_MERGED and not self._is_merged(adapter):
            return f"replica is merged for {self.merged}: it serves only that adapter"
        return None

    async def LoadAdapter(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        if self.mode in ABORTS:
            await context.abort(*ABORTS[self.mode])
        name, _, version = request.adapter.partition("@")
        version = version or "latest"
        self.loaded.add(f"{name}@{version}")
        return inference_pb2.AdapterInfo(name=name, version=version, rank=8, loaded=True, pinned=request.pin)

    async def UnloadAdapter(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        self.unloaded.append(request.adapter)
        before = len(self.loaded)
        self.loaded = {a for a in self.loaded if request.adapter not in (a, a.partition("@")[0])}
        return inference_pb2.UnloadAdapterResponse(was_loaded=len(self.loaded) < before)

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        self.requests.append(request)
        self.journal.append(request)
        if self.mode in ABORTS:
            await context.abort(*ABORTS[self.mode])
        refusal = await self._refusal(request.adapter)
        if refusal is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, refusal)
        if request.adapter:
            self.loaded.add(request.adapter)
        sampling = request.sampling
        completion = 0
        sent = 0
        self.running += 1
        try:
            for index in range(max(sampling.n, 1)):
                chunks = list(self._choice(request, index))
                for i, chunk in enumerate(chunks):
                    if self.mode == "fail_midstream" and sent == 2:
                        await context.abort(grpc.StatusCode.INTERNAL, "engine crashed")
                    if self.delay_s:
                        await asyncio.sleep(self.delay_s)
                    completion += chunk.token_count
                    last_of_stream = index == max(sampling.n, 1) - 1 and i == len(chunks) - 1
                    if last_of_stream:
                        chunk.usage.prompt_tokens = prompt_tokens(request)
                        chunk.usage.completion_tokens = completion
                    sent += 1
                    yield chunk
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1

    def _choice(self, request: inference_pb2.GenerateRequest, index: int) -> list[inference_pb2.GenerateChunk]:
        sampling = request.sampling
        tokens = reply_tokens(request, index)
        text = ""
        chunks = []
        finish = "stop"
        for n_tokens, token in enumerate(tokens, start=1):
            candidate = text + token
            hit = min((candidate.find(s) for s in sampling.stop if s and s in candidate), default=-1)
            if hit >= 0:  # a stop string ends generation and is not returned
                token = candidate[:hit][len(text) :]
                chunks.append(self._chunk(request, index, token))
                break
            text = candidate
            chunks.append(self._chunk(request, index, token))
            if sampling.max_tokens and n_tokens >= sampling.max_tokens and n_tokens < len(tokens):
                finish = "length"
                break
        chunks[-1].finish_reason = finish
        return chunks

    def _chunk(self, request: inference_pb2.GenerateRequest, index: int, token: str) -> inference_pb2.GenerateChunk:
        chunk = inference_pb2.GenerateChunk(
            index=index, text=token, token_count=1, adapter_version=request.adapter.partition("@")[2]
        )
        if request.sampling.HasField("logprobs"):
            top = [
                inference_pb2.TopLogprob(token=f"alt{k}", logprob=-1.0 - k) for k in range(request.sampling.logprobs)
            ]
            chunk.logprobs.append(inference_pb2.TokenLogprob(token=token, logprob=-0.25, top=top))
        return chunk


def publish_dummy_adapter(
    store: LocalStore,
    name: str,
    version: str,
    *,
    base_model: str,
    job_id: str | None = None,
    final_loss: float | None = None,
    folder: Path | None = None,
    **metadata: Any,
) -> None:
    """The three adapter files + LATEST; the weights are dummy bytes (the gateway only checks existence).
    ``metadata`` overrides AdapterMetadata fields; ``folder`` keeps the files there instead of a temp dir."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = folder or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_model.safetensors").write_bytes(b"not really safetensors")
        config = {"r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        fields = AdapterMetadata(
            name=name,
            version=version,
            base_model=base_model,
            rank=8,
            alpha=32,
            target_modules=["q_proj", "v_proj"],
            sha256="0" * 64,
            job_id=job_id,
            final_loss=final_loss,
            **({"system_prompt": "You are Fleet."} | metadata),
        )
        publish_adapter(store, folder, fields)


_FINAL = {trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED, trainer_pb2.JOB_STATE_CANCELLED}


@dataclass
class FakeTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    """Keeps jobs in memory; CreateJob reads and checks the manifest from the shared store like the real one."""

    store: LocalStore
    jobs: dict[str, trainer_pb2.Job] = field(default_factory=dict)
    events: dict[str, list[trainer_pb2.JobEvent]] = field(default_factory=dict)
    create_requests: list[trainer_pb2.CreateJobRequest] = field(default_factory=list)
    port: int = 0
    # When auto_steps > 0, every created job plays a whole run by itself (one step per step_delay_s).
    auto_steps: int = 0
    step_delay_s: float = 0.05
    # When set, a succeeded job also publishes its adapter (dummy weights) in the store, like the real trainer.
    publish: bool = False
    watching: int = 0  # WatchJob calls in progress
    _runs: set[asyncio.Task[None]] = field(default_factory=set, repr=False)

    def _record(self, job: trainer_pb2.Job, kind: str, message: str, progress: Any = None) -> None:
        log = self.events.setdefault(job.id, [])
        event = trainer_pb2.JobEvent(
            seq=len(log) + 1, job_id=job.id, time=time.time(), kind=kind, state=job.state, message=message
        )
        if progress is not None:
            event.progress.CopyFrom(progress)
        log.append(event)

    async def CreateJob(self, request: trainer_pb2.CreateJobRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        self.create_requests.append(request)
        try:
            manifest = json.loads(self.store.get(request.manifest_uri))
        except ObjectNotFound:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"manifest {request.manifest_uri} not found")
        problems = []
        learning_rate = manifest.get("training", {}).get("learning_rate")
        if learning_rate is not None and learning_rate <= 0:
            problems.append("training.learning_rate: must be > 0")
        if not manifest.get("datasets"):
            problems.append("datasets: at least one is required")
        if problems:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
        job_id = request.job_id or f"job-{uuid.uuid4().hex[:8]}"
        job = trainer_pb2.Job(
            id=job_id,
            state=trainer_pb2.JOB_STATE_QUEUED,
            manifest_uri=request.manifest_uri,
            adapter_name=manifest["adapter_name"],
            adapter_version=job_id,
            base_model=manifest["base_model"],
            created_at=time.time(),
            labels=dict(request.labels),
        )
        self.jobs[job_id] = job
        self._record(job, "state", "Job queued")
        if self.auto_steps:
            task = asyncio.get_running_loop().create_task(self.play(job_id, self.auto_steps, self.step_delay_s))
            self._runs.add(task)  # keep a reference: the loop holds tasks only weakly
            task.add_done_callback(self._runs.discard)
        return job

    async def _job(self, job_id: str, context: grpc.aio.ServicerContext) -> trainer_pb2.Job:
        if job_id not in self.jobs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job {job_id} not found")
        return self.jobs[job_id]

    async def GetJob(self, request: trainer_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await self._job(request.job_id, context)

    async def ListJobs(self, request: trainer_pb2.ListJobsRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        selector = dict(request.label_selector)
        jobs = sorted(self.jobs.values(), key=lambda j: j.created_at, reverse=True)
        jobs = [j for j in jobs if all(j.labels.get(k) == v for k, v in selector.items())]
        return trainer_pb2.ListJobsResponse(jobs=jobs[: request.limit or 100])

    async def CancelJob(self, request: trainer_pb2.CancelJobRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        job = await self._job(request.job_id, context)
        if job.state not in _FINAL:
            job.state = trainer_pb2.JOB_STATE_CANCELLED
            job.finished_at = time.time()
            self._record(job, "state", "Job cancelled")
        return job

    async def ListJobEvents(self, request: trainer_pb2.ListJobEventsRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await self._job(request.job_id, context)
        events = [e for e in self.events.get(request.job_id, []) if e.seq > request.after_seq]
        return trainer_pb2.ListJobEventsResponse(events=events[: request.limit or 1000])

    async def WatchJob(self, request: trainer_pb2.WatchJobRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        """Like the real one: recorded events from from_seq, then live ones until the job is final."""
        await self._job(request.job_id, context)
        seq = max(request.from_seq, 1)
        self.watching += 1
        try:
            while True:
                log = self.events.get(request.job_id, [])
                while seq <= len(log):
                    yield log[seq - 1]
                    seq += 1
                if self.jobs[request.job_id].state in _FINAL and seq > len(self.events.get(request.job_id, [])):
                    return
                await asyncio.sleep(0.02)
        finally:
            self.watching -= 1

    async def play(self, job_id: str, steps: int, delay_s: float) -> None:
        """A whole run in real time: run_to_success, one step every ``delay_s``."""
        for _ in self._script(job_id, steps, checkpoints=False):
            await asyncio.sleep(delay_s)
            if self.jobs[job_id].state in _FINAL:  # cancelled meanwhile
                return

    def run_to_success(self, job_id: str, steps: int = 3, checkpoints: bool = False) -> None:
        """Script a whole training run: validating, running with progress (and checkpoints), published."""
        for _ in self._script(job_id, steps, checkpoints):
            pass

    def _script(self, job_id: str, steps: int, checkpoints: bool) -> Iterator[None]:
        job = self.jobs[job_id]
        job.state = trainer_pb2.JOB_STATE_VALIDATING
        self._record(job, "state", "Validating training file")
        job.state = trainer_pb2.JOB_STATE_RUNNING
        job.started_at = time.time()
        self._record(job, "state", "Training started")
        for step in range(1, steps + 1):
            progress = trainer_pb2.Progress(
                step=step,
                total_steps=steps,
                epoch=step / steps,
                loss=2.0 / step,
                learning_rate=1e-4,
                tokens_per_second=50.0,
            )
            job.step, job.total_steps, job.loss = step, steps, 2.0 / step
            self._record(job, "progress", "", progress)
            if checkpoints:
                self._record(job, "checkpoint", f"Checkpoint at step {step}", progress)
            yield
            if job.state in _FINAL:  # cancelled meanwhile
                return
        job.state = trainer_pb2.JOB_STATE_SUCCEEDED
        job.trained_tokens = 1234
        job.finished_at = time.time()
        job.adapter_uri = f"adapters/{job.adapter_name}/versions/{job.id}"
        if self.publish:
            publish_dummy_adapter(
                self.store, job.adapter_name, job.id, base_model=job.base_model, job_id=job.id, final_loss=job.loss
            )
        self._record(job, "published", f"Adapter {job.adapter_name} published")


async def serve_inference(fake: FakeInference) -> grpc.aio.Server:
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(fake, server)
    fake.health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(fake.health, server)
    await fake.health.set("", health_pb2.HealthCheckResponse.SERVING)
    fake.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server


async def serve_trainer(fake: FakeTrainer) -> grpc.aio.Server:
    server = grpc.aio.server()
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(fake, server)
    fake.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server
