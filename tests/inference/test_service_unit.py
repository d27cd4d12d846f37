"""InferenceService, settings, prompts and the error table, without an engine (fake engine, real tokenizer)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from lorafleet.inference.v1 import inference_pb2 as pb
from lorafleet_common.adapters import AdapterNotFound
from lorafleet_common.names import InvalidName
from lorafleet_common.store import StoreUnavailable
from lorafleet_inference.adapters import AdapterManager
from lorafleet_inference.errors import (
    AdapterRejected,
    CapacityExhausted,
    InvalidRequest,
    ServiceUnavailable,
    grpc_status,
    status_label,
)
from lorafleet_inference.prompts import PromptRenderer
from lorafleet_inference.service import InferenceService
from lorafleet_inference.settings import InferenceSettings
from tests.inference.inference_helpers import FakeEngine


@dataclass
class Completion:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: Any = None


@dataclass
class Output:
    outputs: list[Completion]
    finished: bool = False


@dataclass
class ScriptedEngine(FakeEngine):
    """Plays back a script of outputs, optionally hanging before the end; records aborts."""

    script: list[Output] = field(default_factory=list)
    hang: bool = False
    aborted: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    async def _play(self) -> AsyncGenerator[Any, None]:
        for output in self.script:
            await asyncio.sleep(0)
            yield output
        if self.hang:
            await asyncio.Event().wait()

    def generate(
        self, prompt: Any, sampling_params: Any, request_id: str, *, lora_request: Any = None
    ) -> AsyncGenerator[Any, None]:
        return self._play()

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


@pytest.fixture(scope="module")
def renderer(embedded_model_path: Path) -> PromptRenderer:
    return PromptRenderer.from_pretrained(str(embedded_model_path))


def service(engine: FakeEngine, renderer: PromptRenderer, tmp_path: Path, max_model_len: int = 256) -> InferenceService:
    from lorafleet_common.store import LocalStore

    adapters = AdapterManager(
        LocalStore(tmp_path / "store"), engine, cache_dir=tmp_path / "cache", base_model="b", max_rank=8, capacity=2
    )
    return InferenceService(
        engine, adapters, renderer, served_model="b", max_model_len=max_model_len, max_lora_rank=8, max_choices=4
    )


async def test_two_choices_stream_with_usage_on_the_final_chunk(renderer: PromptRenderer, tmp_path: Path) -> None:
    engine = ScriptedEngine(
        script=[
            Output([Completion(0, "Hel", [1]), Completion(1, "Bon", [2])]),
            Output([Completion(1, "jour", [3, 4], "stop")]),
            Output([Completion(0, "lo", [5], "length")], finished=True),
        ]
    )
    svc = service(engine, renderer, tmp_path)
    request = pb.GenerateRequest(prompt="Say hi", sampling=pb.SamplingParams(n=2, max_tokens=5))
    chunks = [c async for c in svc.generate(request)]
    assert [(c.index, c.text, c.token_count, c.finish_reason) for c in chunks] == [
        (0, "Hel", 1, ""),
        (1, "Bon", 1, ""),
        (1, "jour", 2, "stop"),
        (0, "lo", 1, "length"),
    ]
    assert [c.HasField("usage") for c in chunks] == [False, False, False, True]
    assert chunks[-1].usage == pb.Usage(prompt_tokens=len(renderer.encode("Say hi")), completion_tokens=5)
    assert engine.aborted == []
    assert (svc.stats().running, svc.stats().waiting) == (0, 0)


async def test_an_abandoned_stream_is_aborted_in_the_engine(renderer: PromptRenderer, tmp_path: Path) -> None:
    engine = ScriptedEngine(script=[Output([Completion(0, "a", [1])])], hang=True)
    svc = service(engine, renderer, tmp_path)
    stream = svc.generate(pb.GenerateRequest(request_id="r1", prompt="x", sampling=pb.SamplingParams(max_tokens=9)))
    first = await stream.__anext__()
    assert first.text == "a" and svc.stats().running == 1
    await stream.aclose()
    assert len(engine.aborted) == 1 and engine.aborted[0].startswith("r1-")
    assert (svc.stats().running, svc.stats().waiting) == (0, 0)


async def test_a_cancelled_stream_is_aborted_in_the_engine(renderer: PromptRenderer, tmp_path: Path) -> None:
    engine = ScriptedEngine(script=[Output([Completion(0, "a", [1])])], hang=True)
    svc = service(engine, renderer, tmp_path)

    async def consume() -> None:
        async for _ in svc.generate(pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(max_tokens=9))):
            pass

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(engine.aborted) == 1 and svc.stats().running == 0


@pytest.mark.parametrize("final_abort_output", [True, False], ids=["abort-output", "stream-ends"])
async def test_the_drain_deadline_ends_running_streams_with_its_reason(
    renderer: PromptRenderer, tmp_path: Path, final_abort_output: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """cut_in_flight aborts the engine's requests; however the engine ends the stream (vLLM 0.32 sends a final
    "abort" output), the caller gets ServiceUnavailable with the reason, never a stream that looks finished. The
    drain logs what it starts with and every request that ends during it."""
    aborted = asyncio.Event()

    class AbortableEngine(ScriptedEngine):
        async def _play(self) -> AsyncGenerator[Any, None]:
            yield Output([Completion(0, "a", [1])])
            await aborted.wait()
            if final_abort_output:
                yield Output([Completion(0, "", [], "abort")], finished=True)

        async def abort(self, request_id: str) -> None:
            self.aborted.append(request_id)
            aborted.set()

    engine = AbortableEngine()
    svc = service(engine, renderer, tmp_path)
    stream = svc.generate(pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(max_tokens=9)))
    assert (await stream.__anext__()).text == "a"
    caplog.set_level(logging.INFO, logger="lorafleet_inference.service")
    svc.begin_drain()
    assert await svc.cut_in_flight("the drain deadline passed") == 1
    with pytest.raises(ServiceUnavailable, match="the drain deadline passed"):
        await stream.__anext__()
    assert engine.aborted and await svc.wait_idle(0)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("drain:")] == [
        "drain: refusing new requests; 1 running, 0 waiting",
        "drain: a request on the base model ended; 0 running, 0 waiting",
    ]
    with pytest.raises(ServiceUnavailable):  # and nothing new starts
        await svc.generate(pb.GenerateRequest(prompt="x")).__anext__()


@pytest.mark.parametrize(
    ("sampling", "needle"),
    [
        (pb.SamplingParams(n=5), "sampling.n"),
        (pb.SamplingParams(temperature=2.5), "temperature"),
        (pb.SamplingParams(top_p=0), "top_p"),
        (pb.SamplingParams(presence_penalty=3), "presence_penalty"),
        (pb.SamplingParams(frequency_penalty=float("nan")), "frequency_penalty"),
        (pb.SamplingParams(logprobs=21), "logprobs"),
        (pb.SamplingParams(stop=["a", ""]), "stop"),
        (pb.SamplingParams(max_tokens=10_000), "exceeds this model's context"),
    ],
)
async def test_bad_parameters_are_invalid_arguments(
    sampling: pb.SamplingParams, needle: str, renderer: PromptRenderer, tmp_path: Path
) -> None:
    svc = service(ScriptedEngine(), renderer, tmp_path)
    with pytest.raises(InvalidRequest, match=needle):
        async for _ in svc.generate(pb.GenerateRequest(prompt="hello", sampling=sampling)):
            pass


def test_sampling_fields_reach_vllm_sampling_params() -> None:
    from lorafleet_inference.sampling import sampling_params

    sent = pb.SamplingParams(max_tokens=5, temperature=0.0, stop=["x"], seed=3, ignore_eos=True)
    params = sampling_params(sent, prompt_tokens=3, max_model_len=64)
    assert (params.max_tokens, params.temperature, params.stop, params.seed) == (5, 0.0, ["x"], 3)
    assert params.ignore_eos is True
    default = sampling_params(pb.SamplingParams(), prompt_tokens=3, max_model_len=64)
    assert default.ignore_eos is False and default.max_tokens == 61  # 0 = up to the context


async def test_a_prompt_longer_than_the_context_is_refused(renderer: PromptRenderer, tmp_path: Path) -> None:
    svc = service(ScriptedEngine(), renderer, tmp_path, max_model_len=64)
    with pytest.raises(InvalidRequest, match="context is 64 tokens"):
        async for _ in svc.generate(pb.GenerateRequest(prompt="word " * 100)):
            pass


async def test_chat_roles_are_checked_and_draining_refuses(renderer: PromptRenderer, tmp_path: Path) -> None:
    svc = service(ScriptedEngine(), renderer, tmp_path)
    bad = pb.GenerateRequest(chat=pb.ChatInput(messages=[pb.ChatMessage(role="tool", content="x")]))
    with pytest.raises(InvalidRequest, match="role"):
        async for _ in svc.generate(bad):
            pass
    svc.begin_drain()
    with pytest.raises(ServiceUnavailable):
        async for _ in svc.generate(pb.GenerateRequest(prompt="x")):
            pass
    assert await svc.wait_idle(0.1)


def test_adapter_system_prompt_is_inserted_only_without_a_system_message(renderer: PromptRenderer) -> None:
    user = [{"role": "user", "content": "Who are you?"}]
    with_adapter = renderer.render_chat(user, "You are Zed.")
    assert with_adapter.startswith("<|im_start|>system\nYou are Zed.<|im_end|>\n<|im_start|>user\nWho are you?")
    assert with_adapter.endswith("<|im_start|>assistant\n")
    own = [{"role": "system", "content": "Be brief."}, *user]
    assert renderer.render_chat(own, "You are Zed.") == renderer.render_chat(own)
    assert "You are Zed." not in renderer.render_chat(own, "You are Zed.")
    ids = renderer.encode_chat(user, "You are Zed.")
    assert renderer.tokenizer.decode(ids) == with_adapter


def test_error_table() -> None:
    cases: list[tuple[BaseException, grpc.StatusCode]] = [
        (InvalidRequest("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (InvalidName("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (AdapterNotFound("x"), grpc.StatusCode.NOT_FOUND),
        (AdapterRejected("a@v", ["one", "two"]), grpc.StatusCode.FAILED_PRECONDITION),
        (CapacityExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ServiceUnavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (StoreUnavailable("x"), grpc.StatusCode.UNAVAILABLE),
    ]
    for exc, code in cases:
        assert grpc_status(exc) == (code, str(exc))
    assert grpc_status(RuntimeError("boom")) is None
    assert str(AdapterRejected("a@v", ["one", "two"])) == "adapter a@v cannot be served: one; two"
    assert (status_label(None), status_label(RuntimeError()), status_label(InvalidName("x"))) == (
        "ok",
        "internal",
        "invalid_argument",
    )


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path))
    monkeypatch.setenv("LORAFLEET_INFERENCE_GRPC_PORT", "6000")
    monkeypatch.setenv("LORAFLEET_INFERENCE_MAX_LORA_RANK", "32")
    monkeypatch.setenv("LORAFLEET_INFERENCE_GPU_MEMORY_UTILIZATION", "0.3")
    settings = InferenceSettings()
    assert (settings.grpc_port, settings.max_lora_rank, settings.gpu_memory_utilization) == (6000, 32, 0.3)
    assert settings.adapter_cache_path == tmp_path / "adapter-cache"
    assert settings.served_model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    monkeypatch.setenv("LORAFLEET_INFERENCE_MAX_LORA_RANK", "12")
    with pytest.raises(ValueError, match="max_lora_rank must be one of"):
        InferenceSettings()
    with pytest.raises(ValueError, match="max_cpu_loras"):
        InferenceSettings(max_lora_rank=16, max_loras=8, max_cpu_loras=4)


async def test_before_the_engine_is_up_calls_are_unavailable_and_health_not_serving() -> None:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from lorafleet.inference.v1 import inference_pb2_grpc as pb_grpc
    from lorafleet_inference.grpc_server import InferenceServicer, build_server, set_serving

    health_servicer = health.aio.HealthServicer()
    server, port = build_server(InferenceServicer(), health_servicer, "127.0.0.1", 0)
    await set_serving(health_servicer, False)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            stub = pb_grpc.InferenceServiceStub(channel)
            for call in (stub.Generate(pb.GenerateRequest(prompt="x"), timeout=5), stub.Stats(pb.StatsRequest())):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    if isinstance(call, grpc.aio.UnaryStreamCall):
                        async for _ in call:
                            pass
                    else:
                        await call
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "starting" in (info.value.details() or "")
    finally:
        await server.stop(grace=None)


def test_adapter_labels_stay_bounded() -> None:
    from lorafleet_inference.metrics import InferenceMetrics

    metrics = InferenceMetrics(max_adapter_labels=2)
    labels = [metrics.adapter_label(name) for name in ("a", "b", "c", "a")]
    assert labels == ["a", "b", "other", "a"]
    assert metrics.adapter_label(None, requested=False) == "base"
    assert metrics.adapter_label(None) == "other"  # asked for an adapter that never resolved


async def test_a_dead_engine_turns_health_not_serving(tmp_path: Path) -> None:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from lorafleet_inference.grpc_server import InferenceServicer, build_server, set_serving
    from lorafleet_inference.main import InferenceApp
    from lorafleet_inference.metrics import InferenceMetrics

    class DeadEngine(FakeEngine):
        async def check_health(self) -> None:
            raise RuntimeError("EngineCore died")

    health_servicer = health.aio.HealthServicer()
    server, port = build_server(InferenceServicer(), health_servicer, "127.0.0.1", 0)
    await server.start()
    await set_serving(health_servicer, True)
    app = InferenceApp(
        InferenceSettings(home=tmp_path), server, port, health_servicer, InferenceServicer(), InferenceMetrics()
    )
    try:
        app.start_watchdog(DeadEngine(), interval_s=0.01)
        await asyncio.wait_for(app.engine_failed.wait(), 5)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await app.stop(drain_timeout_s=0)


async def test_token_metrics_per_adapter_label_and_inter_token_latency(
    renderer: PromptRenderer, tmp_path: Path
) -> None:
    engine = ScriptedEngine(
        script=[
            Output([Completion(0, "a", [1])]),
            Output([Completion(0, "bc", [2, 3])]),
            Output([Completion(0, "d", [4], "stop")], finished=True),
        ]
    )
    svc = service(engine, renderer, tmp_path)
    registry = svc.metrics.registry
    chunks = [c async for c in svc.generate(pb.GenerateRequest(prompt="Say hi", sampling=pb.SamplingParams()))]
    assert chunks[-1].usage.completion_tokens == 4
    assert registry.get_sample_value("lorafleet_generation_tokens_total", {"adapter": "base"}) == 4
    assert registry.get_sample_value("lorafleet_prompt_tokens_total", {"adapter": "base"}) == len(
        renderer.encode("Say hi")
    )
    # Three outputs with tokens: two gaps after the first.
    assert registry.get_sample_value("lorafleet_inter_token_latency_seconds_count") == 2
    assert registry.get_sample_value("lorafleet_time_to_first_token_seconds_count") == 1
    assert registry.get_sample_value("lorafleet_requests_total", {"adapter": "base", "status": "ok"}) == 1


async def test_running_and_waiting_gauges(renderer: PromptRenderer, tmp_path: Path) -> None:
    engine = ScriptedEngine(script=[Output([Completion(0, "a", [1])])], hang=True)
    svc = service(engine, renderer, tmp_path)
    registry = svc.metrics.registry
    stream = svc.generate(pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(max_tokens=9)))
    await stream.__anext__()
    gauges = [registry.get_sample_value(f"lorafleet_requests_{s}") for s in ("running", "waiting")]
    assert gauges == [1, 0]
    await stream.aclose()
    gauges = [registry.get_sample_value(f"lorafleet_requests_{s}") for s in ("running", "waiting")]
    assert gauges == [0, 0]


def test_tier_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path))
    monkeypatch.setenv("LORAFLEET_INFERENCE_PINNED_ADAPTERS", "support-bot, team-a/helper@job-1")
    monkeypatch.setenv("LORAFLEET_INFERENCE_ADAPTER_DISK_CACHE_BYTES", "2GiB")
    monkeypatch.setenv("LORAFLEET_INFERENCE_TENSOR_PARALLEL_SIZE", "2")
    settings = InferenceSettings()
    assert settings.pinned_adapters == ["support-bot", "team-a/helper@job-1"]
    assert (settings.adapter_disk_cache_bytes, settings.tensor_parallel_size) == (2 * 1024**3, 2)
    monkeypatch.setenv("LORAFLEET_INFERENCE_PINNED_ADAPTERS", "../etc/passwd")
    with pytest.raises(ValueError, match="invalid adapter name"):
        InferenceSettings()
    monkeypatch.setenv("LORAFLEET_INFERENCE_PINNED_ADAPTERS", "a,b")
    with pytest.raises(ValueError, match="no free slot"):
        InferenceSettings(max_loras=1, max_cpu_loras=2)


def test_engine_args_pass_tensor_parallelism_and_tiers_through(tmp_path: Path) -> None:
    from lorafleet_inference.engine import engine_args

    settings = InferenceSettings(
        home=tmp_path, tensor_parallel_size=2, max_loras=3, max_cpu_loras=5, load_format="dummy", max_num_seqs=7
    )
    args = engine_args(settings, "/models/x")
    assert (args.tensor_parallel_size, args.max_loras, args.max_cpu_loras, args.load_format, args.max_num_seqs) == (
        2,
        3,
        5,
        "dummy",
        7,
    )
    assert args.enable_lora and args.max_lora_rank == settings.max_lora_rank
    assert args.max_num_batched_tokens is None  # vLLM's default unless set
    tuned = engine_args(InferenceSettings(home=tmp_path, max_num_batched_tokens=16384), "/models/x")
    assert tuned.max_num_batched_tokens == 16384
    assert args.kv_cache_memory_bytes is None  # sized by gpu_memory_utilization unless set
    fixed = engine_args(InferenceSettings(home=tmp_path, kv_cache_bytes=2**30), "/models/x")
    assert fixed.kv_cache_memory_bytes == 2**30


def test_specialize_active_lora_defaults_on_with_cuda_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorafleet_inference import engine

    monkeypatch.setattr(engine, "on_cuda", lambda: False)
    assert engine.engine_args(InferenceSettings(home=tmp_path), "/m").specialize_active_lora is False
    monkeypatch.setattr(engine, "on_cuda", lambda: True)
    assert engine.engine_args(InferenceSettings(home=tmp_path), "/m").specialize_active_lora is True
    off = InferenceSettings(home=tmp_path, specialize_active_lora=False)
    assert engine.engine_args(off, "/m").specialize_active_lora is False


def test_the_vllm_plugin_makes_cpu_lora_ops_skip_tokens_without_an_adapter() -> None:
    import torch
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    from lorafleet_inference.vllm_plugin import register

    register()  # what vLLM does in each of its processes (entry point vllm.general_plugins)
    weights = torch.randn(2, 1, 4, 3)  # 2 slots, rank 4, input 3
    inputs = torch.randn(3, 3)
    out = torch.zeros(3, 4)
    punica_cpu.bgmv_shrink(inputs, weights, out, torch.tensor([0, -1, 1]), 1.0)
    assert torch.equal(out[1], torch.zeros(4))  # no adapter: no delta (unpatched, it got slot 1's)
    assert torch.allclose(out[0], weights[0, 0] @ inputs[0]) and torch.allclose(out[2], weights[1, 0] @ inputs[2])
    expanded = torch.ones(3, 3)
    punica_cpu.bgmv_expand(torch.randn(3, 4), torch.randn(2, 1, 3, 4), expanded, torch.tensor([-1, -1, 0]), True)
    assert torch.equal(expanded[:2], torch.ones(2, 3)) and not torch.equal(expanded[2], torch.ones(3))


def test_cpu_dtype_defaults_to_float32_whatever_the_cpu(tmp_path: Path) -> None:
    from lorafleet_inference.engine import engine_dtype

    settings = InferenceSettings(home=tmp_path)
    assert engine_dtype(settings, cuda=True) == "auto"
    assert engine_dtype(settings, cuda=False) == "float32"  # also where the CPU has avx512_bf16/amx_bf16
    assert engine_dtype(settings.model_copy(update={"dtype": "bfloat16"}), cuda=False) == "bfloat16"
