"""InferenceService: generation and the adapter lifecycle of one replica, independent of gRPC.

Requests and replies are the contract's protobuf messages (lorafleet.inference.v1);
errors are the domain exceptions of ``errors``; the gRPC servicer only adapts.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

from lorafleet.inference.v1 import inference_pb2 as pb
from lorafleet_inference.adapters import AdapterManager, LoadedAdapter
from lorafleet_inference.engine import Engine, token_prompt
from lorafleet_inference.errors import ContextLengthExceeded, InvalidRequest, ServiceUnavailable, status_label
from lorafleet_inference.merge import MergeController, MergeEngine, MergePolicy
from lorafleet_inference.metrics import InferenceMetrics
from lorafleet_inference.prompts import PromptRenderer
from lorafleet_inference.sampling import check_request, sampling_params, token_logprobs

log = logging.getLogger(__name__)

ABORT_TIMEOUT_S = 5.0


@dataclass
class _Progress:
    """Where one request is: waiting (no token yet) or running, and which adapter serves it."""

    running: bool = False
    adapter_name: str | None = None  # set once the adapter resolved: unresolved names never become labels
    label: str = "other"  # the adapter label of the request's metrics
    last_token_at: float | None = None


class InferenceService:
    """One engine, its adapters, and the requests running on them."""

    def __init__(
        self,
        engine: Engine,
        adapters: AdapterManager,
        renderer: PromptRenderer,
        *,
        served_model: str,
        max_model_len: int,
        max_lora_rank: int,
        max_choices: int = 16,
        max_logprobs: int = 20,
        metrics: InferenceMetrics | None = None,
        merge: MergePolicy | None = None,
    ) -> None:
        self.engine = engine
        self.adapters = adapters
        self.renderer = renderer
        self.served_model = served_model
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank
        self.max_choices = max_choices
        self.max_logprobs = max_logprobs
        self.metrics = metrics or InferenceMetrics(memory=False)
        self._waiting = 0  # admitted, no token yet (resolving the adapter, queued, prefilling)
        self._running = 0  # producing tokens
        self._draining = False
        self._cut_reason = ""  # set when the drain deadline passed: running generations end with it
        self._engine_ids: set[str] = set()  # engine requests now generating
        self._idle = asyncio.Event()
        self._idle.set()
        self.merge = MergeController(
            cast(MergeEngine, engine),
            adapters,
            merge or MergePolicy(),
            wait_idle=self.wait_idle,
            in_flight=lambda: self._running + self._waiting,
            metrics=self.metrics,
        )

    # ----- generation -------------------------------------------------------------------------

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateChunk]:
        """Stream the chunks of one request (see GenerateChunk); aborts the engine request if abandoned."""
        started = time.monotonic()
        error: BaseException | None = None
        progress = _Progress()
        entered = False
        try:
            if self._draining:
                raise ServiceUnavailable("this replica is shutting down; retry on another")
            check_request(request, max_choices=self.max_choices, max_logprobs=self.max_logprobs)
            # Before counting the request in flight: a switch of mode waits for those, and this may wait for it.
            merged = await self.merge.admit(request.adapter)
            self._enter()
            entered = True
            if self._draining:  # began while this waited for a switch
                raise ServiceUnavailable("this replica is shutting down; retry on another")
            async with self._adapter(request.adapter, merged) as adapter:
                progress.adapter_name = adapter.name if adapter else None
                progress.label = self.metrics.adapter_label(progress.adapter_name, requested=bool(request.adapter))
                prompt_ids = self._prompt_ids(request, adapter)
                params = sampling_params(
                    request.sampling, prompt_tokens=len(prompt_ids), max_model_len=self.max_model_len
                )
                chunks = self._stream(request, prompt_ids, params, adapter, started, progress)
                async with aclosing(chunks):
                    async for chunk in chunks:
                        yield chunk
        except BaseException as exc:
            error = exc
            raise
        finally:
            if entered:
                self._leave(progress)
            label = self.metrics.adapter_label(progress.adapter_name, requested=bool(request.adapter))
            status = "cancelled" if isinstance(error, (asyncio.CancelledError, GeneratorExit)) else status_label(error)
            self.metrics.requests.labels(label, status).inc()
            self.metrics.request_seconds.observe(time.monotonic() - started)

    async def _stream(
        self,
        request: pb.GenerateRequest,
        prompt_ids: list[int],
        params: Any,
        adapter: LoadedAdapter | None,
        started: float,
        progress: _Progress,
    ) -> AsyncGenerator[pb.GenerateChunk, None]:
        # Unique even if callers reuse ids; the caller's part is kept short (it shows up in logs).
        engine_id = f"{request.request_id[:64] or 'gen'}-{uuid.uuid4().hex[:12]}"
        version = adapter.version if adapter else ""
        top_k = request.sampling.logprobs if request.sampling.HasField("logprobs") else None
        choices, finished, completion_tokens = request.sampling.n or 1, set[int](), 0
        done = False
        lora_request = adapter.lora_request if adapter else None
        if self._cut_reason:  # admitted before the drain, still waiting for its adapter when the deadline passed
            raise ServiceUnavailable(self._cut_reason)
        stream = self.engine.generate(token_prompt(prompt_ids), params, engine_id, lora_request=lora_request)
        self._engine_ids.add(engine_id)
        try:
            async with aclosing(stream):
                async for output in self._engine_outputs(stream):
                    self._observe_token_gap(progress, output)
                    for completion in output.outputs:
                        if self._cut_reason and completion.finish_reason == "abort":
                            raise ServiceUnavailable(self._cut_reason)  # cut_in_flight aborted it
                        tokens = len(completion.token_ids)
                        if tokens and not progress.running:
                            self._started_generating(progress, started)
                        completion_tokens += tokens
                        chunk = pb.GenerateChunk(
                            index=completion.index,
                            text=completion.text,
                            token_count=tokens,
                            finish_reason=completion.finish_reason or "",
                            adapter_version=version,
                        )
                        if top_k is not None and completion.logprobs:
                            chunk.logprobs.extend(token_logprobs(completion, top_k))
                        if completion.finish_reason:
                            finished.add(completion.index)
                            if len(finished) == choices:  # the stream's final chunk carries usage
                                chunk.usage.CopyFrom(_usage(prompt_ids, completion_tokens))
                        if chunk.text or chunk.token_count or chunk.finish_reason:
                            yield chunk
            if self._cut_reason and len(finished) < choices:
                raise ServiceUnavailable(self._cut_reason)
            done = True
            unfinished = [i for i in range(choices) if i not in finished]
            for index in unfinished:  # the engine ended the stream early: close every choice, then usage
                chunk = pb.GenerateChunk(index=index, finish_reason="abort", adapter_version=version)
                if index == unfinished[-1]:
                    chunk.usage.CopyFrom(_usage(prompt_ids, completion_tokens))
                yield chunk
        finally:
            self._engine_ids.discard(engine_id)
            self.metrics.prompt_tokens.labels(progress.label).inc(len(prompt_ids))
            self.metrics.generation_tokens.labels(progress.label).inc(completion_tokens)
            if not done:
                # The caller went away (or something failed): free the engine's slot and KV cache now.
                try:
                    await asyncio.wait_for(self.engine.abort(engine_id), ABORT_TIMEOUT_S)
                except Exception:
                    log.warning("could not abort %s", engine_id, exc_info=True)

    async def _engine_outputs(self, stream: AsyncIterator[Any]) -> AsyncGenerator[Any, None]:
        """The engine's outputs, its failures translated into domain errors."""
        try:
            async for output in stream:
                yield output
        except ValueError as exc:  # vLLM's request validation (VLLMValidationError is a ValueError)
            raise InvalidRequest(str(exc)) from exc
        except Exception as exc:
            if await self._engine_dead():
                raise ServiceUnavailable("the engine is not running") from exc
            raise

    async def _engine_dead(self) -> bool:
        try:
            await asyncio.wait_for(self.engine.check_health(), 5.0)
            return False
        except Exception:
            return True

    @asynccontextmanager
    async def _adapter(self, ref: str, merged: LoadedAdapter | None) -> AsyncIterator[LoadedAdapter | None]:
        if merged is not None or not ref:
            yield merged  # merged mode: the adapter is in the weights (its lora_request is None)
            return
        async with self.adapters.use(ref) as adapter:
            yield adapter

    def _observe_token_gap(self, progress: _Progress, output: Any) -> None:
        """Inter-token latency: the gap since the previous output, per token this one carries."""
        tokens = max((len(c.token_ids) for c in output.outputs), default=0)
        if not tokens:
            return
        now = time.monotonic()
        if progress.last_token_at is not None:
            self.metrics.inter_token_latency.observe((now - progress.last_token_at) / tokens)
        progress.last_token_at = now

    def _enter(self) -> None:
        self._waiting += 1
        self._idle.clear()
        self._update_gauges()

    def _started_generating(self, progress: _Progress, started: float) -> None:
        progress.running = True
        self._waiting -= 1
        self._running += 1
        self._update_gauges()
        self.metrics.time_to_first_token.observe(time.monotonic() - started)

    def _leave(self, progress: _Progress) -> None:
        if progress.running:
            self._running -= 1
        else:
            self._waiting -= 1
        self._update_gauges()
        if self._draining:  # a shutdown's progress, for whoever watches the replica go (a handful of lines)
            log.info(
                "drain: a request on %s ended; %d running, %d waiting",
                progress.adapter_name or "the base model",
                self._running,
                self._waiting,
            )
        if self._running + self._waiting == 0:
            self._idle.set()

    def _update_gauges(self) -> None:
        self.metrics.requests_running.set(self._running)
        self.metrics.requests_waiting.set(self._waiting)

    # ----- request checks ---------------------------------------------------------------------

    def _prompt_ids(self, request: pb.GenerateRequest, adapter: LoadedAdapter | None) -> list[int]:
        if request.WhichOneof("input") == "prompt":
            ids = self.renderer.encode(request.prompt)
        else:
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            system_prompt = adapter.metadata.system_prompt if adapter else None
            ids = self.renderer.encode_chat(messages, system_prompt)
        if not ids:
            raise InvalidRequest("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ContextLengthExceeded(
                f"the prompt is {len(ids)} tokens; this model's context is {self.max_model_len} tokens "
                "(prompt plus completion), so it leaves no room to generate"
            )
        return ids

    # ----- adapters and state -----------------------------------------------------------------

    async def load_adapter(self, request: pb.LoadAdapterRequest) -> pb.AdapterInfo:
        return adapter_info(await self.adapters.load(request.adapter, pin=request.pin))

    async def unload_adapter(self, request: pb.UnloadAdapterRequest) -> pb.UnloadAdapterResponse:
        return pb.UnloadAdapterResponse(was_loaded=await self.adapters.unload(request.adapter))

    def list_adapters(self) -> pb.ListAdaptersResponse:
        return pb.ListAdaptersResponse(adapters=[adapter_info(a) for a in self.adapters.loaded()])

    async def merge_adapter(self, request: pb.MergeAdapterRequest) -> pb.MergeAdapterResponse:
        if self._draining:
            raise ServiceUnavailable("this replica is shutting down")
        return await self.merge.switch(request.adapter, force=request.force)

    def stats(self) -> pb.StatsResponse:
        # loaded_adapters is the cpu tier (registered with the engine): what the gateway routes on.
        tiers = self.adapters.tiers()
        stats = pb.StatsResponse(
            running=self._running,
            waiting=self._waiting + self.merge.held,
            loaded_adapters=[a.key for a in self.adapters.loaded()],
            base_model=self.served_model,
            max_lora_rank=self.max_lora_rank,
            gpu_adapters=tiers["gpu"],
            disk_adapters=tiers["disk"],
            max_loras=self.adapters.gpu.capacity,
            max_cpu_loras=self.adapters.capacity,
        )
        self.merge.fill_stats(stats)
        return stats

    def begin_drain(self) -> None:
        """Refuse new Generate calls (UNAVAILABLE); running ones go on."""
        self._draining = True
        log.info("drain: refusing new requests; %d running, %d waiting", self._running, self._waiting)

    async def cut_in_flight(self, reason: str) -> int:
        """End every running generation now with ServiceUnavailable(``reason``), which its caller receives as
        UNAVAILABLE with that message (rather than the bare cancellation of a stopping server); returns how
        many were cut. For the drain deadline: the engine is about to shut down."""
        self._cut_reason = reason
        engine_ids = list(self._engine_ids)
        for engine_id in engine_ids:
            try:
                await asyncio.wait_for(self.engine.abort(engine_id), ABORT_TIMEOUT_S)
            except Exception:
                log.warning("could not abort %s", engine_id, exc_info=True)
        return len(engine_ids)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; False if ``timeout_s`` passed first."""
        if self._idle.is_set():
            return True  # wait_for(..., 0) would time out even on a set event
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False


def adapter_info(adapter: LoadedAdapter) -> pb.AdapterInfo:
    meta = adapter.metadata
    return pb.AdapterInfo(
        name=adapter.name,
        version=adapter.version,
        rank=meta.rank,
        base_model=meta.base_model,
        sha256=meta.sha256,
        loaded=True,
        pinned=adapter.pinned,
        system_prompt=meta.system_prompt or "",
    )


def _usage(prompt_ids: list[int], completion_tokens: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion_tokens)
