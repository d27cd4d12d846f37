"""Settings of the inference service (LORAFLEET_INFERENCE_* plus the shared LORAFLEET_* fields)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import ByteSize, Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from lorafleet_common.names import parse_adapter_ref
from lorafleet_common.settings import CommonSettings

# The ranks vLLM accepts for max_lora_rank (vllm/config/lora.py); anything else fails at engine start.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class InferenceSettings(CommonSettings):
    """How one inference replica runs: where it listens, what the engine may hold."""

    model_config = SettingsConfigDict(
        env_prefix="LORAFLEET_INFERENCE_", env_ignore_empty=True, extra="ignore", populate_by_name=True
    )

    host: str = Field(default="127.0.0.1", description="Address the gRPC and metrics servers bind to.")
    grpc_port: int = Field(default=50051, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    metrics_port: int = Field(default=9101, ge=0, le=65535, description="Prometheus /metrics port; 0 turns it off.")
    max_loras: int = Field(default=4, ge=1, description="Adapters the engine can apply within one batch.")
    max_lora_rank: int = Field(default=16, description=f"Largest LoRA rank accepted; one of {VLLM_LORA_RANKS}.")
    max_cpu_loras: int = Field(
        default=8, ge=1, description="Adapters kept loaded (LRU-evicted beyond this); must be >= max_loras."
    )
    max_model_len: int = Field(default=2048, ge=16, description="Context length: prompt plus generated tokens.")
    max_num_seqs: int | None = Field(default=None, ge=1, description="Sequences per engine step; None = vLLM's.")
    max_num_batched_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Tokens per engine step (the prefill chunk). None = vLLM's default for a serving engine "
        "(2048 in vLLM 0.26 on an H100; its offline LLM class uses 16384). Larger raises throughput of "
        "prompt-heavy load, smaller keeps inter-token latency low while prompts are being prefilled.",
    )
    specialize_active_lora: bool | None = Field(
        default=None,
        description="Size the LoRA kernels' grid by the adapters active in a step instead of by max_loras, "
        "with one CUDA graph per power-of-two count of active adapters (vLLM's specialize_active_lora). "
        "Without it every LoRA kernel launches blocks for all max_loras slots, most of which exit at once "
        "when few adapters are in use. None = on with CUDA (H100, Qwen2.5-7B: one adapter 0.67 -> 0.78 of the "
        "base model's throughput, 8 adapters 0.63 -> 0.72; engine start ~1 min longer), off on CPU. vLLM picks "
        "these graphs without counting base-model requests; our vLLM plugin reorders its LoRA tables so an adapter "
        "beside base-model requests is still applied (lora_order.py).",
    )
    lora_kernel_configs: Literal["packaged", "vllm"] | Path = Field(
        default="packaged",
        description="Launch configurations for vLLM's LoRA kernels (Triton shrink/expand), handed to vLLM as "
        "VLLM_TUNED_CONFIG_FOLDER. 'packaged' = the files shipped in lorafleet_inference/lora_kernel_configs "
        "(tuned by bench/tune_lora_kernels.py on an H100 80GB HBM3 for Qwen2.5-7B's projections, rank 16, 32 "
        "slots; other GPUs find no file there and get vLLM's defaults), unless VLLM_TUNED_CONFIG_FOLDER is "
        "already set; 'vllm' = vLLM's one default for every shape; or a folder of your own tuning.",
    )
    lora_tight_grid: bool = Field(
        default=True,
        description="On CUDA, launch vLLM's LoRA kernels over the token blocks each adapter has in a step "
        "instead of over the whole step for every adapter (lora_grid.py; every step with two or more adapters, "
        "CUDA-graph decode steps included). Off = vLLM's own grid.",
    )
    lora_fold: bool | None = Field(
        default=None,
        description="In steps whose requests all use one adapter (base-model requests may share the step), fold "
        "that adapter into the base model's GEMM for qkv and gate_up instead of running vLLM's shrink and expand "
        "after it (lora_fold.py): the projection's output is written once. Needs specialize_active_lora on CUDA "
        "(off without it); costs slices x max_lora_rank extra weight columns per projection and one input buffer "
        "of max_num_batched_tokens rows. None = on with CUDA, off on CPU.",
    )
    lora_fold_rank_budget: int | None = Field(
        default=None,
        ge=0,
        description="With lora_fold on: steps of several adapters that run without a CUDA graph (prefill chunks "
        "past the largest captured size) fold their adapters into the same GEMMs too, each loaded slot in as many "
        "columns per slice as its rank (lora_fold_multi.py), up to this many rank units in all; slots past it keep "
        "vLLM's kernels. Costs slices x this budget extra weight columns per qkv and gate_up projection (Qwen2.5-7B: "
        "5.7 MiB per rank unit, 1.4 GiB at 256). None = 8 x max_loras (a rank-8 adapter in every slot); 0 = one "
        "adapter only.",
    )
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Fraction of accelerator memory for weights and KV cache (on CPU: of one NUMA node's "
        "memory). None = 0.2 on CPU, 0.9 on CUDA.",
    )
    kv_cache_bytes: int | None = Field(
        default=None,
        gt=0,
        description="A fixed KV cache size in bytes (vLLM's kv_cache_memory_bytes); gpu_memory_utilization then "
        "no longer sizes it. On a CPU, vLLM otherwise takes the fraction of one NUMA node's memory minus the "
        "engine's own RSS, which on a small node leaves nothing; a fixed size also skips the warm-up pass that "
        "the automatic sizing needs.",
    )
    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] | None = Field(
        default=None,
        description="Weight and activation dtype passed to vLLM. None = 'auto' on CUDA, float32 on a CPU: vLLM's "
        "auto picks bfloat16 there, which AVX2-only CPUs emulate about 3x slower, and which on a CPU with AMX ran "
        "the embedded model 1.5-1.75x faster but changed its greedy answers and made batched outputs differ from "
        "single ones (docs/inference.md). bfloat16 on a CPU is opt-in and not covered by the tests.",
    )
    enforce_eager: bool | None = Field(
        default=None, description="Disable CUDA graphs / torch.compile. None = True on CPU, False on CUDA."
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="GPUs to shard the model (and the LoRA slots) over; passed to vLLM as is."
    )
    load_format: Literal["auto", "safetensors", "dummy"] = Field(
        default="auto", description="How vLLM reads the base weights; 'dummy' = random weights (benchmarks only)."
    )
    adapter_cache_dir: Path | None = Field(
        default=None, description="The disk tier: validated adapter copies. Default: <home>/adapter-cache."
    )
    adapter_disk_cache_bytes: ByteSize | None = Field(
        default=ByteSize(20 * 1024**3),
        description="Byte budget of the disk tier (e.g. '20GiB'); least recently used adapters that are not "
        "loaded or pinned are deleted to stay under it. Must hold max_cpu_loras adapters. None = unbounded.",
    )
    pinned_adapters: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Adapters ('name' or 'name@version', comma-separated) loaded and pinned at start-up, "
        "never evicted. Failures are logged and do not keep the replica from serving.",
    )
    load_timeout_s: float = Field(
        default=120.0, gt=0, description="Upper bound on fetching, validating and loading one adapter."
    )
    latest_ttl_s: float = Field(
        default=5.0, ge=0, description="How long an unversioned name's LATEST version is cached before re-reading."
    )
    engine_start_timeout_s: float = Field(default=600.0, gt=0, description="Upper bound on engine start-up.")
    drain_timeout_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long in-flight streams may run before they are cut."
    )
    merge_enabled: bool = Field(
        default=False,
        description="Let MergeAdapter switch this replica into merged mode: one adapter added into the base "
        "weights, served without LoRA cost, and nothing else served meanwhile. Costs a host-RAM copy of every "
        "base linear weight an adapter changes, taken at the first merge and kept (about 13 GB for Qwen2.5-7B "
        "bf16 with all seven projections). Off: MergeAdapter answers FAILED_PRECONDITION.",
    )
    merge_min_hold_s: float = Field(
        default=300.0,
        ge=0,
        description="A merge younger than this is not replaced (by another adapter, another version or LoRA "
        "mode) unless MergeAdapter passes force: keeps a replica from flapping between hot adapters.",
    )
    merge_drain_timeout_s: float = Field(
        default=60.0,
        ge=0,
        description="How long a switch into or out of merged mode waits for the requests in flight to finish. "
        "If some are still running then, the switch is abandoned (UNAVAILABLE) and the replica stays in its "
        "mode; streams are never cut. Requests the new mode will serve wait for the switch meanwhile.",
    )
    max_choices: int = Field(default=16, ge=1, description="Largest n (choices per request) accepted.")
    max_logprobs: int = Field(default=20, ge=0, description="Largest number of top log-probabilities per token.")

    @field_validator("pinned_adapters", mode="before")
    @classmethod
    def _split_pinned(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("pinned_adapters")
    @classmethod
    def _pinned_names_valid(cls, value: list[str]) -> list[str]:
        for ref in value:
            parse_adapter_ref(ref)  # InvalidName is a ValueError: reported as a settings error
        return value

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_vllm_accepts(cls, value: int) -> int:
        if value not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {VLLM_LORA_RANKS}, got {value}")
        return value

    @model_validator(mode="after")
    def _cpu_cache_holds_a_batch(self) -> Self:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        if len(self.pinned_adapters) >= self.max_cpu_loras:
            raise ValueError(
                f"{len(self.pinned_adapters)} pinned adapters leave no free slot of max_cpu_loras "
                f"({self.max_cpu_loras}) for the others"
            )
        return self

    @property
    def adapter_cache_path(self) -> Path:
        return self.adapter_cache_dir or self.home / "adapter-cache"

    @property
    def served_model_name(self) -> str:
        """The name clients use for the base model (the base model id, not the local folder)."""
        return self.base_model
