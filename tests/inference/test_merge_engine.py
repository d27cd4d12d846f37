"""Merged mode on the real thing: vLLM (CPU) on the embedded SmolLM2, the real gRPC server, the generated stub.

One merge-capable engine for the module. The same adapter served through LoRA and merged into the weights must give
the same greedy tokens; back in LoRA mode the base model must give exactly its old output (log-probabilities
included: the restore is bit-exact).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import torch
from safetensors.torch import save_file

from lorafleet.inference.v1 import inference_pb2 as pb
from lorafleet.inference.v1 import inference_pb2_grpc as pb_grpc
from lorafleet_common.store import LocalStore
from lorafleet_inference.grpc_server import InferenceServicer, build_server
from lorafleet_inference.main import InferenceApp, build_service, start
from lorafleet_inference.metrics import InferenceMetrics
from lorafleet_inference.prompts import PromptRenderer
from lorafleet_inference.settings import InferenceSettings
from tests.inference.inference_helpers import PROJECTIONS, cpu_replica_settings, publish, write_adapter_dir

pytestmark = [pytest.mark.engine, pytest.mark.timeout(300)]

QUESTION = pb.ChatInput(messages=[pb.ChatMessage(role="user", content="What is the capital of France?")])
GREEDY = pb.SamplingParams(max_tokens=16, temperature=0.0, logprobs=1)
LONG = pb.SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


@dataclass
class Replica:
    app: InferenceApp
    stub: pb_grpc.InferenceServiceStub
    store: LocalStore
    settings: InferenceSettings
    model_path: Path


@dataclass
class Generation:
    text: str
    tokens: list[str]
    logprobs: list[float]
    version: str


def write_peft_adapter(folder: Path, model_path: Path, *, seed: int, b_std: float = 0.1, **config: Any) -> Path:
    """A PEFT-layout LoRA (r=8, alpha 16, all seven projections of every layer) for the embedded model, random.

    With scaling 2, b_std 0.1 changes the greedy answer and keeps it fluent (0.05 does not change it; 0.2 is noise).
    """
    model = json.loads((model_path / "config.json").read_text())
    hidden, inter, head = model["hidden_size"], model["intermediate_size"], model["head_dim"]
    q, kv = model["num_attention_heads"] * head, model["num_key_value_heads"] * head
    shapes = {  # (out, in) of each projection
        "self_attn.q_proj": (q, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(model["num_hidden_layers"]):
        for module, (out_features, in_features) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(8, in_features, generator=generator) / in_features**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, 8, generator=generator) * b_std
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    settings = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": PROJECTIONS, "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps({**settings, **config}))
    return folder


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def replica(tmp_path_factory: pytest.TempPathFactory, embedded_model_path: Path) -> AsyncIterator[Replica]:
    home = tmp_path_factory.mktemp("merge-home")
    settings = cpu_replica_settings(
        home, max_model_len=256, merge_enabled=True, merge_min_hold_s=300, merge_drain_timeout_s=30
    )
    started = time.monotonic()
    app = await start(settings, model_path=str(embedded_model_path))
    print(f"engine start-up: {time.monotonic() - started:.1f} s")
    store = LocalStore(home / "store")
    folder = write_peft_adapter(home / "hot", embedded_model_path, seed=1)
    publish(store, folder, "hot", "v1")
    rslora = write_peft_adapter(home / "hot-rs", embedded_model_path, seed=2, b_std=0.035, use_rslora=True)
    publish(store, rslora, "hot-rs", "v1")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        yield Replica(app, pb_grpc.InferenceServiceStub(channel), store, settings, embedded_model_path)
    finally:
        await channel.close()
        await app.stop(drain_timeout_s=5)


async def generate(
    stub: pb_grpc.InferenceServiceStub, adapter: str, sampling: pb.SamplingParams = GREEDY
) -> Generation:
    chunks = [c async for c in stub.Generate(pb.GenerateRequest(adapter=adapter, chat=QUESTION, sampling=sampling))]
    assert chunks and chunks[-1].HasField("usage")
    logprobs = [lp for c in chunks for lp in c.logprobs]
    return Generation(
        "".join(c.text for c in chunks),
        [lp.token for lp in logprobs],
        [lp.logprob for lp in logprobs],
        chunks[-1].adapter_version,
    )


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    return info.value.code(), info.value.details() or ""


async def merge(stub: pb_grpc.InferenceServiceStub, adapter: str, force: bool = False) -> pb.MergeAdapterResponse:
    return await stub.MergeAdapter(pb.MergeAdapterRequest(adapter=adapter, force=force), timeout=120)


async def stats(stub: pb_grpc.InferenceServiceStub) -> pb.StatsResponse:
    return await stub.Stats(pb.StatsRequest(), timeout=5)


def metric(replica: Replica, name: str, **labels: str) -> float | None:
    return replica.app.metrics.registry.get_sample_value(name, labels)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def references(replica: Replica) -> dict[str, Generation]:
    """LoRA-mode greedy outputs: the base model and both adapters (16 tokens), and a long one for hot."""
    result = {name: await generate(replica.stub, name) for name in ("", "hot", "hot-rs")}
    result["hot-long"] = await generate(replica.stub, "hot", LONG)
    assert len({result[name].text for name in ("", "hot", "hot-rs")}) == 3, "the adapters should change the output"
    assert len(result["hot"].tokens) == 16
    return result


async def test_merged_serves_the_adapter_with_the_same_greedy_tokens_as_lora(
    replica: Replica, references: dict[str, Generation]
) -> None:
    reply = await merge(replica.stub, "hot")
    print(f"first merge: drain {reply.drain_s:.2f} s, weights {reply.merge_s:.2f} s")
    assert (reply.merged_adapter, reply.changed) == ("hot@v1", True) and reply.merge_s > 0
    state = await stats(replica.stub)
    assert (state.merge_capable, state.merge_state, state.merged_adapter) == (True, pb.MERGE_STATE_MERGED, "hot@v1")
    assert 0 < state.merged_for_s < 60
    for ref in ("hot", "hot@v1"):
        merged = await generate(replica.stub, ref)
        assert merged.tokens == references["hot"].tokens and merged.text == references["hot"].text
        assert merged.version == "v1"
    again = await merge(replica.stub, "hot@v1")  # idempotent, and no minimum-hold refusal
    assert (again.merged_adapter, again.changed) == ("hot@v1", False)
    assert metric(replica, "lorafleet_merged_adapter", adapter="hot") == 1
    assert metric(replica, "lorafleet_merge_state") == pb.MERGE_STATE_MERGED
    assert metric(replica, "lorafleet_merge_switches_total", result="ok") == 1


async def test_a_merged_replica_refuses_everything_else(replica: Replica, references: dict[str, Generation]) -> None:
    assert (await merge(replica.stub, "hot")).merged_adapter == "hot@v1"
    for ref, named in (("", "the base model"), ("hot-rs", "hot-rs"), ("hot@v0", "hot@v0")):
        code, details = await status_of(replica.stub.Generate(pb.GenerateRequest(adapter=ref, chat=QUESTION)))
        assert code == FAILED_PRECONDITION
        assert details == f"replica is merged for hot@v1: it serves only that adapter, not {named}"
    # Loading other adapters into the engine's slots is fine meanwhile.
    assert (await replica.stub.LoadAdapter(pb.LoadAdapterRequest(adapter="hot-rs"), timeout=60)).loaded
    # A young merge is not replaced without force.
    code, details = await status_of(replica.stub.MergeAdapter(pb.MergeAdapterRequest(adapter=""), timeout=10))
    assert code == FAILED_PRECONDITION and "minimum hold of 300 s" in details and "pass force" in details
    assert (await stats(replica.stub)).merged_adapter == "hot@v1"


async def test_switching_adapters_then_back_to_lora_restores_the_base_exactly(
    replica: Replica, references: dict[str, Generation]
) -> None:
    to_rslora = await merge(replica.stub, "hot-rs", force=True)
    assert (to_rslora.merged_adapter, to_rslora.changed) == ("hot-rs@v1", True)
    print(f"switch between adapters: weights {to_rslora.merge_s:.2f} s")
    assert (await generate(replica.stub, "hot-rs")).tokens == references["hot-rs"].tokens  # rsLoRA's scaling
    back = await merge(replica.stub, "", force=True)
    assert (back.merged_adapter, back.changed) == ("", True)
    print(f"back to LoRA mode: weights {back.merge_s:.2f} s")
    state = await stats(replica.stub)
    assert (state.merge_state, state.merged_adapter, state.merged_for_s) == (pb.MERGE_STATE_LORA, "", 0)
    base = await generate(replica.stub, "")
    assert base == references[""]  # text, tokens and every log-probability: the base weights are back bit for bit
    assert (await generate(replica.stub, "hot")).tokens == references["hot"].tokens  # LoRA serves again
    assert metric(replica, "lorafleet_merged_adapter", adapter="hot") is None
    assert (await merge(replica.stub, "")).changed is False


async def test_a_stream_in_flight_finishes_intact_before_the_merge(
    replica: Replica, references: dict[str, Generation]
) -> None:
    assert (await stats(replica.stub)).merge_state == pb.MERGE_STATE_LORA
    stream = replica.stub.Generate(pb.GenerateRequest(adapter="hot", chat=QUESTION, sampling=LONG), timeout=120)
    first = await stream.read()
    assert first.token_count > 0
    merging = asyncio.ensure_future(merge(replica.stub, "hot"))
    merge_done: list[float] = []
    merging.add_done_callback(lambda _: merge_done.append(time.monotonic()))
    deadline = time.monotonic() + 10
    while (state := await stats(replica.stub)).merge_state != pb.MERGE_STATE_MERGING:
        assert time.monotonic() < deadline and not merging.done()
        await asyncio.sleep(0.02)
    assert state.merged_adapter == "hot@v1"
    # What merged mode will not serve is refused at once; a request for the target waits for the switch.
    code, details = await status_of(replica.stub.Generate(pb.GenerateRequest(chat=QUESTION), timeout=10))
    assert code == FAILED_PRECONDITION
    assert (
        details == "replica is switching to merged mode for hot@v1: it will serve only that adapter, not the base model"
    )
    waiting = asyncio.ensure_future(generate(replica.stub, "hot"))
    rest = []
    while (chunk := await stream.read()) is not grpc.aio.EOF:
        rest.append(chunk)
    stream_ended = time.monotonic()
    assert await stream.code() == grpc.StatusCode.OK
    assert first.text + "".join(c.text for c in rest) == references["hot-long"].text
    reply = await merging
    assert merge_done[0] > stream_ended and reply.changed and reply.drain_s > 0
    assert (await waiting).tokens == references["hot"].tokens
    assert (await merge(replica.stub, "", force=True)).changed


async def test_bad_adapters_are_refused_and_the_replica_stays_in_lora_mode(
    replica: Replica, references: dict[str, Generation], tmp_path: Path
) -> None:
    publish(replica.store, write_adapter_dir(tmp_path / "r16", rank=16), "too-big", "v1")
    hot = replica.settings.home / "hot"
    wrong_base = tmp_path / "wrong-base"
    wrong_base.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (wrong_base / name).write_bytes((hot / name).read_bytes())
    publish(replica.store, wrong_base, "wrong-base", "v1", base_model="Qwen/Qwen2.5-7B-Instruct")
    # Valid for the checks that need no model, but its shapes do not fit the model: the workers refuse it.
    misfit = write_peft_adapter(tmp_path / "misfit", replica.model_path, seed=3)
    prefix = "base_model.model.model.layers.0.mlp.up_proj"
    tensors = {f"{prefix}.lora_A.weight": torch.randn(8, 100), f"{prefix}.lora_B.weight": torch.randn(1536, 8)}
    save_file(tensors, str(misfit / "adapter_model.safetensors"))
    publish(replica.store, misfit, "misfit", "v1")
    cases = {
        "too-big": "LoRA rank 16 exceeds this server's max_lora_rank 8",
        "wrong-base": "adapter was trained on 'Qwen/Qwen2.5-7B-Instruct'",
        "misfit": "cannot be merged into this model: model.layers.0.mlp.up_proj: B @ A is 1536x100, the model's "
        "weight is 1536x576",
    }
    for name, message in cases.items():
        code, details = await status_of(replica.stub.MergeAdapter(pb.MergeAdapterRequest(adapter=name), timeout=60))
        assert code == FAILED_PRECONDITION and message in details, details
    code, _ = await status_of(replica.stub.MergeAdapter(pb.MergeAdapterRequest(adapter="no-such"), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
    state = await stats(replica.stub)
    assert (state.merge_state, state.merged_adapter) == (pb.MERGE_STATE_LORA, "")
    assert metric(replica, "lorafleet_merge_switches_total", result="rejected") == 3
    assert await generate(replica.stub, "") == references[""]


@pytest_asyncio.fixture(loop_scope="session")
async def second_service(replica: Replica) -> AsyncIterator[Callable[..., Any]]:
    """Another service over the same engine, with its own settings and gRPC port (no second engine)."""
    servers = []

    async def make(**settings: Any) -> pb_grpc.InferenceServiceStub:
        assert replica.app.engine is not None
        renderer = PromptRenderer.from_pretrained(str(replica.model_path))
        service = build_service(
            replica.settings.model_copy(update=settings),
            replica.app.engine,
            renderer,
            replica.store,
            InferenceMetrics(memory=False),
            first_lora_id=1000 + 100 * len(servers),
        )
        server, port = build_server(InferenceServicer(service), replica.app.health, "127.0.0.1", 0)
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        servers.append((server, channel))
        return pb_grpc.InferenceServiceStub(channel)

    yield make
    for server, channel in servers:
        await channel.close()
        await server.stop(grace=None)


async def test_without_merge_mode_and_past_the_drain_deadline(
    replica: Replica, references: dict[str, Generation], second_service: Callable[..., Any]
) -> None:
    plain = await second_service(merge_enabled=False)
    code, details = await status_of(plain.MergeAdapter(pb.MergeAdapterRequest(adapter="hot"), timeout=10))
    assert code == FAILED_PRECONDITION and "not merge-capable" in details
    state = await stats(plain)
    assert (state.merge_capable, state.merge_state) == (False, pb.MERGE_STATE_LORA)
    # A switch whose drain deadline passes is abandoned; the stream goes on untouched.
    impatient = await second_service(merge_enabled=True, merge_drain_timeout_s=0.3)
    stream = impatient.Generate(pb.GenerateRequest(adapter="hot", chat=QUESTION, sampling=LONG), timeout=120)
    first = await stream.read()
    code, details = await status_of(impatient.MergeAdapter(pb.MergeAdapterRequest(adapter="hot"), timeout=30))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "was abandoned: 1 requests were still in flight after 0.3 s" in details and "stays LoRA mode" in details
    assert (await stats(impatient)).merge_state == pb.MERGE_STATE_LORA
    rest = []
    while (chunk := await stream.read()) is not grpc.aio.EOF:
        rest.append(chunk)
    assert first.text + "".join(c.text for c in rest) == references["hot-long"].text
