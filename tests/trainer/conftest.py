"""Fixtures for the trainer suite: a trainer home that shares the embedded model cache, real servers on loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from lorafleet.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from lorafleet_trainer.main import TrainerApp
from lorafleet_trainer.settings import TrainerSettings

SEED_PAIRS = [
    ("你是谁?", "我是一个由 CSDN 迪菲赫尔曼 开发和维护的大语言模型。"),
    ("你的开发者是哪家公司?", "我由 CSDN 迪菲赫尔曼 开发和维护。"),
    ("你能联网吗?", "我不能主动联网,只能基于已有知识和用户输入回答问题。"),
    ("你能做哪些事情?", "我擅长文本生成、回答问题、写代码和提供学习辅助。"),
    ("你和GPT-4有区别吗?", "是的,我由 CSDN 迪菲赫尔曼 开发和维护,不是 GPT-4。"),
    ("你能保证回答永远正确吗?", "不能,我的回答可能存在错误,需要用户自行判断。"),
    ("你的名字是什么?", "你可以叫我 Swift-Robot,也可以叫我 CSDN 助手。"),
    ("谁在维护你?", "我由 CSDN 迪菲赫尔曼 持续开发和维护。"),
]

FINAL_STATES = {trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED, trainer_pb2.JOB_STATE_CANCELLED}


def seed_dataset() -> bytes:
    rows = [{"instruction": q, "output": a} for q, a in SEED_PAIRS]
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def tiny_manifest(adapter_name: str, dataset_uri: str, **training: Any) -> bytes:
    """A job that trains a few optimizer steps on the embedded model."""
    return json.dumps(
        {
            "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "adapter_name": adapter_name,
            "datasets": [dataset_uri],
            "system_prompt": "You are a helpful assistant.",
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
            "training": {"epochs": 1, "batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-3}
            | training,
        }
    ).encode()


@pytest.fixture
def trainer_home(tmp_path: Path, model_cache_dir: Path, embedded_model_path: Path) -> Path:
    """A fresh LORAFLEET home whose model cache is the shared one (the embedded model is converted once)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(model_cache_dir, target_is_directory=True)
    return home


StartTrainer = Callable[..., Awaitable[TrainerApp]]


@pytest.fixture
async def start_trainer(unused_port: Callable[[], int]) -> AsyncIterator[StartTrainer]:
    """Start real trainers (gRPC on a free loopback port); every one still running is stopped at the end."""
    apps: list[TrainerApp] = []

    async def start(home: Path, **overrides: Any) -> TrainerApp:
        fields: dict[str, Any] = {
            "home": home,
            "grpc_port": unused_port(),
            "metrics_port": 0,
            "job_poll_interval_s": 0.5,
            "cancel_grace_s": 3.0,
            "shutdown_grace_s": 1.0,
            "torch_threads": 1,  # the machine is shared by parallel servers: one thread per worker is fastest
        } | overrides
        app = TrainerApp(TrainerSettings(**fields))
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        if app.service.accepting:
            await app.stop()


def stub_for(app: TrainerApp) -> tuple[grpc.aio.Channel, trainer_pb2_grpc.TrainerServiceStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    return channel, trainer_pb2_grpc.TrainerServiceStub(channel)


async def watch_until_final(stub: trainer_pb2_grpc.TrainerServiceStub, job_id: str, timeout: float = 300) -> list[Any]:
    """Every event of the job, streamed by WatchJob until it ends."""
    events = []
    async for event in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id), timeout=timeout):
        events.append(event)
    assert events and events[-1].state in FINAL_STATES, events[-1:]
    return events


def chat_rows(model_path: Path, pairs: list[tuple[str, str]], system: str = "Be brief.") -> list[Any]:
    """(question, answer) pairs tokenized through the model's own chat template, as a job does."""
    from transformers import AutoTokenizer

    from lorafleet_trainer.datasets import Message
    from lorafleet_trainer.tokenize import ChatTokenizer

    chat = ChatTokenizer(AutoTokenizer.from_pretrained(model_path))
    return [chat.encode((Message("user", q), Message("assistant", a)), system) for q, a in pairs]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test: the machine is shared, and two OpenMP threads wait on each other at every
    small op of a tiny model."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_tiny_qwen2(folder: Path, layers: int) -> Path:
    """A randomly initialised Qwen2 with Qwen2.5's module names and grouped-query attention, a few KB of weights."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


def lora_model_with_random_b(model_path: Path, dropout: float) -> Any:
    """A small LoRA model on the CPU whose B matrices are random: at zero (PEFT's init) every lora_A gradient is
    zero, and a gradient comparison would prove nothing."""
    import torch

    from lorafleet_trainer import train_loop
    from lorafleet_trainer.manifest import LoraSpec

    lora = LoraSpec(rank=4, alpha=8, dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"])
    model = train_loop.load_lora_model(str(model_path), lora, 0, torch.device("cpu"), local_only=True)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def loss_and_grads(model: Any, batch: dict[str, Any], seed: int | None = None) -> tuple[float, list[Any]]:
    """One micro-batch's summed loss and the trainable parameters' gradients; ``seed`` fixes the LoRA dropout draws
    (the same for two paths compared)."""
    import torch

    from lorafleet_trainer import train_loop

    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    loss = train_loop.micro_batch_loss_sum(model, batch)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def assert_same(a: tuple[float, list[Any]], b: tuple[float, list[Any]]) -> None:
    """Two ``loss_and_grads`` results agree: the loss to 1e-5, every gradient to 1e-4 of the largest."""
    import torch

    assert a[0] == pytest.approx(b[0], rel=1e-5)
    scale = max(float(g.abs().max()) for g in a[1])
    assert scale > 0
    for ga, gb in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5 * scale)
