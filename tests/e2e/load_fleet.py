"""Real service processes under load, for the soak and graceful-shutdown tests: tenants with real LoRA adapters
in a local object store, the services started as operators start them (fault_fleet's helpers), and streams
measured as the official openai client sees them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

from lorafleet_common.store import LocalStore
from tests.conftest import free_port
from tests.e2e.fault_fleet import ADMIN_KEY, publish_folder, start, write_adapter
from tests.service_processes import ServiceProcess, grpc_probe, http_probe

# The engine start-up (20-30 s quiet) takes minutes when the shared CI machine is busy.
READY_TIMEOUT_S = 300


def publish_tenant_adapters(home: Path, model_path: Path, adapters: list[tuple[str, str]]) -> None:
    """A real LoRA for the embedded model per (tenant, name), each with its own weights, as ``<tenant>/<name>``."""
    store = LocalStore(home / "store")
    for seed, (tenant, name) in enumerate(adapters):
        folder = write_adapter(home.parent / "adapters" / f"{tenant}-{name}", model_path, seed=seed)
        publish_folder(store, folder, f"{tenant}/{name}")  # type: ignore[arg-type]  # any ObjectStore does


def _env(prefix: str, settings: dict[str, Any]) -> dict[str, str]:
    return {f"LORAFLEET_{prefix}_{key.upper()}": str(value) for key, value in settings.items()}


def _ready(proc: ServiceProcess, probe: Any) -> ServiceProcess:
    try:
        took = proc.wait_ready(probe, READY_TIMEOUT_S)
    except BaseException:
        proc.kill()
        raise
    print(f"{proc.service} ready after {took:.1f} s")
    return proc


def start_inference(home: Path, **settings: Any) -> tuple[ServiceProcess, int]:
    """``python -m lorafleet_inference`` on a free port, SERVING; LORAFLEET_INFERENCE_<KEY> from ``settings``."""
    port = free_port()
    values: dict[str, Any] = {
        "grpc_port": port,
        "metrics_port": 0,
        "max_lora_rank": 8,
        "max_model_len": 512,
        # ~1 GiB of KV cache (about 20k tokens, for 16 streams of 512 tokens at most) instead of the default 3.3
        # GiB: less to allocate at start-up, less memory taken from the shared test machine.
        "gpu_memory_utilization": 0.1,
    }
    proc = start("inference", home, _env("INFERENCE", values | settings))
    return _ready(proc, grpc_probe(port)), port


def start_gateway(
    home: Path, inference_port: int, name: str = "gateway", **settings: Any
) -> tuple[ServiceProcess, str]:
    """``python -m lorafleet_gateway`` in front of one replica, ready; LORAFLEET_GATEWAY_<KEY> from ``settings``."""
    port = free_port()
    values: dict[str, Any] = {
        "port": port,
        "inference_targets": f"127.0.0.1:{inference_port}",
        "trainer_target": f"127.0.0.1:{free_port()}",  # no trainer: these tests only generate
        "health_interval_s": 1,
    }
    proc = start("gateway", home, _env("GATEWAY", values | settings), name)
    url = f"http://127.0.0.1:{port}"
    return _ready(proc, http_probe(f"{url}/ready")), url


def start_trainer(home: Path, port: int, name: str = "trainer", **settings: Any) -> ServiceProcess:
    """``python -m lorafleet_trainer`` on ``port`` (fixed: a restart serves the same address), SERVING."""
    values: dict[str, Any] = {"grpc_port": port, "metrics_port": 0} | settings
    return _ready(start("trainer", home, _env("TRAINER", values), name), grpc_probe(port))


def create_tenant_keys(url: str, tenants: list[str]) -> dict[str, str]:
    """Each tenant created through the admin API, with one API key: tenant -> key."""
    keys = {}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=15) as admin:
        for tenant in tenants:
            created = admin.post("/v1/admin/tenants", json={"id": tenant, "name": f"Tenant {tenant}"})
            assert created.status_code == 201, created.text
            key = admin.post(f"/v1/admin/tenants/{tenant}/keys", json={"name": "load"})
            assert key.status_code == 201, key.text
            keys[tenant] = key.json()["key"]
    return keys


def async_client(url: str, api_key: str, timeout_s: float = 120) -> openai.AsyncOpenAI:
    # No client retries: a failure must show, not be papered over.
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=timeout_s)


@dataclass
class StreamResult:
    """What one streamed chat completion delivered, as the client saw it."""

    model: str
    error: str = ""
    tokens: int = 0  # generated tokens the client received: one logprob entry each
    finish_reason: str | None = None
    completion_tokens: int | None = None  # from the final usage chunk
    first_token_at: float | None = None  # time.monotonic() of the first token
    first_token_s: float | None = None
    last_token_at: float | None = None  # time.monotonic() of the latest token
    finish_at: float | None = None  # of the chunk that carried the finish_reason
    ended_at: float | None = None  # the stream's end: after the usage chunk and [DONE], or the error
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.error and self.completion_tokens is not None

    def timeline(self, since: float) -> str:
        """Where the time went, in seconds from ``since`` (for failure messages): tokens, first and last token,
        finish_reason chunk, end."""
        marks = {
            "first": self.first_token_at,
            "last": self.last_token_at,
            "finish": self.finish_at,
            "end": self.ended_at,
        }
        at = " ".join(f"{name} {t - since:+.2f}" for name, t in marks.items() if t is not None)
        return f"{self.model}: {self.tokens} tokens, {at}"


async def stream_chat(
    client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int, result: StreamResult | None = None
) -> StreamResult:
    """One streamed chat completion of exactly ``max_tokens`` tokens (ignore_eos), with usage and logprobs.

    Logprobs make the client's count exact: a token that ends inside a UTF-8 sequence streams no text, but
    always its logprob entry. ``result`` (a new one by default) is filled in as chunks arrive, so a caller
    can watch a stream in flight.
    """
    result = result or StreamResult(model)
    begin = time.monotonic()
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.8,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.usage is not None:
                result.completion_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.logprobs is not None and choice.logprobs.content:
                    if result.first_token_at is None:
                        result.first_token_at = time.monotonic()
                        result.first_token_s = result.first_token_at - begin
                    result.tokens += len(choice.logprobs.content)
                    result.last_token_at = time.monotonic()
                if choice.finish_reason and result.finish_at is None:
                    result.finish_at = time.monotonic()
                result.finish_reason = choice.finish_reason or result.finish_reason
    except openai.OpenAIError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.ended_at = time.monotonic()
    result.seconds = result.ended_at - begin
    return result


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]
