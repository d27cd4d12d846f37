"""The comparison point: vLLM's offline engine (``vllm.LLM``) with the settings our service gives vLLM, the same
prompts (token ids from the same tokenizer), the same adapters from local folders, all requests at once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

# The engine arguments our service sets (lorafleet_inference.engine.engine_args); everything else is vLLM's default
# in both cases.
SERVICE_ENGINE_FIELDS = (
    "model",
    "dtype",
    "max_model_len",
    "gpu_memory_utilization",
    "enforce_eager",
    "tensor_parallel_size",
    "enable_lora",
    "max_loras",
    "max_lora_rank",
    "max_cpu_loras",
    "load_format",
    "max_num_seqs",
    "max_num_batched_tokens",
    "specialize_active_lora",
)


def service_engine_kwargs(settings: Any, model_dir: str) -> dict[str, Any]:
    from lorafleet_inference.engine import engine_args

    args = engine_args(settings, model_dir)
    return {name: getattr(args, name) for name in SERVICE_ENGINE_FIELDS}


class RawEngine:
    def __init__(self, kwargs: dict[str, Any]) -> None:
        from vllm import LLM

        started = time.perf_counter()
        self.llm = LLM(seed=0, **kwargs)
        self.init_s = time.perf_counter() - started
        self.kwargs = kwargs

    def engine_info(self) -> dict[str, Any]:
        try:
            vc = self.llm.llm_engine.vllm_config
            return {
                "max_num_batched_tokens": vc.scheduler_config.max_num_batched_tokens,
                "num_gpu_blocks": vc.cache_config.num_gpu_blocks,
                "cudagraph_mode": str(vc.compilation_config.cudagraph_mode),
                "prefix_caching": vc.cache_config.enable_prefix_caching,
            }
        except Exception as exc:  # only informative
            return {"error": repr(exc)}

    def generate(self, token_ids: list[list[int]], adapters: list[Path | None], max_tokens: int) -> dict[str, Any]:
        """All requests at once, greedy, ignore_eos, text detokenized (as the service streams it)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        ids = {path: i + 1 for i, path in enumerate(sorted({p for p in adapters if p is not None}))}
        requests = [LoRARequest(p.name, ids[p], str(p)) if p is not None else None for p in adapters]
        prompts = [TokensPrompt(prompt_token_ids=t) for t in token_ids]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        started = time.perf_counter()
        outputs = self.llm.generate(prompts, params, lora_request=requests, use_tqdm=False)  # type: ignore[arg-type]
        wall = time.perf_counter() - started
        counts = [len(o.outputs[0].token_ids) for o in outputs]
        return {
            "wall_s": wall,
            "out_tokens": sum(counts),
            "out_tok_s": sum(counts) / wall,
            "req_s": len(counts) / wall,
            "tokens_per_request_min": min(counts),
            "tokens_per_request_max": max(counts),
        }
