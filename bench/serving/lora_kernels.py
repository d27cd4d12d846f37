"""What vLLM's multi-LoRA Triton kernels are asked to compute for one model, the configurations worth trying, the
choice among measured ones, and the files vLLM reads them from. No GPU needed here (tune_lora_kernels.py times).

vLLM applies an adapter to each linear layer with two kernels per engine step (punica_gpu.add_lora_linear):
*shrink* ``buffer[s] = x @ A[s]ᵀ`` (fp32 buffer, one slice per fused projection) and *expand*
``y[:, slice s] += buffer[s] @ B[s]ᵀ``. Each looks up its Triton launch configuration by
``[max_loras + 1][num_slices][m][k][n]`` in ``$VLLM_TUNED_CONFIG_FOLDER/{gpu}_SHRINK.json`` and
``{gpu}_EXPAND_TRUE.json`` (the nearest key where the exact one is missing, except ``num_slices``), else uses one
default for every shape: vllm/lora/ops/triton_ops/utils.py ``get_lora_op_configs``. m is the step's token count
(a padded CUDA-graph batch while decoding, up to max_num_batched_tokens while prefilling); shrink's k is the
layer's input size and n the rank, expand's k the rank and n the widest slice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    kv: int  # k_proj / v_proj width (kv heads x head dim)
    layers: int


MODEL_SHAPES = {
    "qwen2.5-7b": ModelShape(hidden=3584, intermediate=18944, kv=512, layers=28),
    "tiny": ModelShape(hidden=64, intermediate=128, kv=16, layers=2),  # CPU smoke runs
}


@dataclass(frozen=True)
class KernelShape:
    """One kernel call of one layer kind, as the punica wrapper makes it."""

    op: str  # "shrink" | "expand"
    name: str  # the projections it serves
    widths: tuple[int, ...]  # shrink: the input width (one); expand: each slice's output width
    slices: int
    rank: int
    calls_per_layer: int

    @property
    def k(self) -> int:
        return self.widths[0] if self.op == "shrink" else self.rank

    @property
    def n(self) -> int:
        return self.rank if self.op == "shrink" else max(self.widths)

    @property
    def label(self) -> str:
        return f"{self.op} {self.name}"


def kernel_shapes(model: ModelShape, rank: int) -> list[KernelShape]:
    """The seven projections of a Qwen2/Llama decoder layer as vLLM fuses them: qkv (3 slices), o, gate_up (2), down."""
    h, i = model.hidden, model.intermediate
    return [
        KernelShape("shrink", "qkv", (h,), 3, rank, 1),
        KernelShape("shrink", "o", (h,), 1, rank, 1),
        KernelShape("shrink", "gate_up", (h,), 2, rank, 1),
        KernelShape("shrink", "down", (i,), 1, rank, 1),
        KernelShape("expand", "qkv", (h, model.kv, model.kv), 3, rank, 1),
        KernelShape("expand", "o+down", (h,), 1, rank, 2),  # the same key: one slice, n = hidden
        KernelShape("expand", "gate_up", (i, i), 2, rank, 1),
    ]


def vllm_lookup_args(shape: KernelShape, m: int, max_loras: int) -> dict[str, Any]:
    """The arguments lora_shrink_op / lora_expand_op pass to vLLM's get_lora_op_configs for this call
    (max_loras + 1 rows: slot -1, "no adapter", has its own)."""
    return {
        "op_type": shape.op,
        "max_loras": max_loras + 1,
        "batch": m,
        "hidden_size": shape.k if shape.op == "shrink" else shape.n,
        "rank": shape.rank,
        "num_slices": shape.slices,
        "add_inputs": True if shape.op == "expand" else None,
    }


def shrink_space(k: int, rank: int) -> list[dict[str, Any]]:
    """Shrink candidates: x is read once per slice, so the split of k (split_k x block_k) sets the parallelism
    for small m and the tile height (block_m) the number of programs for large m. Left out: splits whose chunks
    pass the end of k (block_k x split_k > 2k: their extra programs only add masked loads), a third pipeline
    stage where a program makes fewer than four steps along k, 8 warps below 128-row tiles."""
    block_n = max(16, 1 << (rank - 1).bit_length())
    out = []
    for block_m in (16, 32, 64, 128):
        for block_k in (32, 64, 128, 256):
            for split_k in (1, 2, 4, 8, 16, 32, 64):
                if block_k * split_k > 2 * k:
                    continue
                steps = k / (block_k * split_k)
                for num_stages in (2, 3) if steps >= 4 else (2,):
                    for num_warps in (4, 8) if block_m >= 128 else (4,):
                        out.append(
                            {
                                "block_m": block_m,
                                "block_n": block_n,
                                "block_k": block_k,
                                "split_k": split_k,
                                "num_warps": num_warps,
                                "num_ctas": 1,
                                "num_stages": num_stages,
                                "group_size_m": 8,
                            }
                        )
    return out


def expand_space(rank: int) -> list[dict[str, Any]]:
    """Expand candidates: k is the rank (one block_k covers it), so tiles of the output decide everything."""
    block_k = max(16, 1 << (rank - 1).bit_length())
    return [
        {
            "block_m": block_m,
            "block_n": block_n,
            "block_k": block_k,
            "num_warps": num_warps,
            "num_ctas": 1,
            "num_stages": num_stages,
        }
        for block_m in (16, 32, 64, 128)
        for block_n in (32, 64, 128, 256)
        for num_warps in (4, 8)
        for num_stages in (2, 3)
    ]


def space(shape: KernelShape) -> list[dict[str, Any]]:
    return shrink_space(shape.k, shape.rank) if shape.op == "shrink" else expand_space(shape.rank)


def token_counts(max_tokens: int) -> list[int]:
    """Step sizes to tune: 1 (one stream decoding), then powers of two from 16 up to the prefill chunk."""
    counts = [1]
    m = 16
    while m < max_tokens:
        counts.append(m)
        m *= 2
    return counts + [max_tokens]


def active_counts(wanted: Sequence[int], m: int, max_loras: int) -> list[int]:
    """Adapters active in a step of m tokens (never more than m or max_loras), deduplicated, in order."""
    return sorted({min(a, m, max_loras) for a in wanted})


@dataclass(frozen=True)
class Choice:
    config: dict[str, Any]
    ratios: dict[Any, float]  # active adapters (or (m, active)) -> tuned time / default time
    default: bool  # nothing beat the default by enough


def choose(
    default_ms: dict[Any, float],
    candidates: Iterable[tuple[dict[str, Any], dict[Any, float]]],
    default_config: dict[str, Any],
    worst_ratio: float = 1.05,
    min_gain: float = 0.03,
) -> Choice:
    """The candidate with the best geometric-mean speed-up over the default across the active-adapter counts,
    provided no count gets more than ``worst_ratio`` slower; the default itself unless the gain is at least
    ``min_gain`` (a config that wins by noise is not worth a file entry)."""
    best: Choice | None = None
    best_score = 1.0
    for config, times in candidates:
        if set(times) != set(default_ms):
            continue  # failed for some count (e.g. out of shared memory)
        ratios = {a: times[a] / default_ms[a] for a in default_ms}
        if max(ratios.values()) > worst_ratio:
            continue
        score = math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios))
        if score < best_score:
            best, best_score = Choice(config, ratios, False), score
    if best is None or best_score > 1.0 - min_gain:
        return Choice(default_config, {a: 1.0 for a in default_ms}, True)
    return best


def pick(by_m: dict[int, dict[str, Any]], joint_from: int) -> dict[int, Choice]:
    """One choice per step size below `joint_from`; one for all from it up, chosen on all of them together.

    ``by_m[m]``: ``ms`` (the default's time per active-adapter count), ``measured`` ([(config, times)], the same
    candidates in the same order for every m) and ``default`` (the default config).

    Each launch configuration is a separate Triton compilation, made the first time a step of that size comes.
    Steps up to the CUDA-graph capture size (512) are compiled while graphs are captured at start; larger ones
    (prefill chunks, any token count) would compile in the middle of serving, once per configuration and per
    token-count divisibility (m % 16), so they share one configuration, as vLLM's default does."""
    choices = {m: choose(d["ms"], d["measured"], d["default"]) for m, d in by_m.items() if m < joint_from}
    joint = [m for m in by_m if m >= joint_from]
    if joint:
        default_ms = {(m, a): t for m in joint for a, t in by_m[m]["ms"].items()}
        candidates = [
            (config, {(m, a): t for m in joint for a, t in by_m[m]["measured"][i][1].items()})
            for i, (config, _) in enumerate(by_m[joint[0]]["measured"])
        ]
        together = choose(default_ms, candidates, by_m[joint[-1]]["default"])
        for m in joint:
            ratios = {a: r for (mm, a), r in together.ratios.items() if mm == m}
            choices[m] = Choice(together.config, ratios, together.default)
    return choices


def vllm_file_names(gpu_name: str) -> dict[str, str]:
    """The file each op reads, named the way vLLM derives it from torch.cuda.get_device_name()."""
    gpu = gpu_name.replace(" ", "_").replace("-", "_")
    return {"shrink": f"{gpu}_SHRINK.json", "expand": f"{gpu}_EXPAND_TRUE.json"}


def vllm_config_files(
    gpu_name: str, max_loras: int, chosen: Iterable[tuple[KernelShape, int, dict[str, Any]]]
) -> dict[str, dict[str, Any]]:
    """{file name: config_data} with config_data[max_loras + 1][num_slices][m][k][n] = config.

    vLLM asks with ``lora_ids.size(0)``, which is max_loras + 1 (slot -1, "no adapter", has its own row)."""
    names = vllm_file_names(gpu_name)
    files: dict[str, dict[str, Any]] = {}
    for shape, m, config in chosen:
        data = files.setdefault(names[shape.op], {})
        node = data.setdefault(str(max_loras + 1), {}).setdefault(str(shape.slices), {})
        node.setdefault(str(m), {}).setdefault(str(shape.k), {})[str(shape.n)] = config
    return files


def merge_config_files(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` with every entry ``new`` has replaced (nested dicts merged key by key; neither is changed)."""
    merged = dict(old)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_config_files(merged[key], value)
        else:
            merged[key] = value
    return merged
