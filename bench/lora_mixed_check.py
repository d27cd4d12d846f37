"""Do adapters stay applied when base-model requests share their engine steps? End to end, through the replica's
own engine (lorafleet_inference.engine.build_engine: vLLM with CUDA graphs and specialize_active_lora on a GPU),
stock vLLM against vLLM with our plugin (lora_order.py, lora_grid.py).

A tiny Qwen2 with dummy weights and two random adapters whose deltas are large. Every request is greedy. Each
request is first run alone; then in mixes that share engine steps: one adapter beside base-model requests, two
adapters beside one, and two adapters without any. A request of a mix must produce the tokens it produced alone.
If an adapter is dropped in the mixed steps, its request produces what the base model would instead.

    python bench/lora_mixed_check.py [--variants vllm,ours,ours-fold,ours-no-fold,...] [--out DIR]

Each variant runs in a process of its own (vLLM loads plugins at process start): ``vllm`` without any plugin
(VLLM_PLUGINS names none), ``ours`` as the replica runs, ``ours-vllm-grid`` with the tight grid off, ``ours-fold``
and ``ours-no-fold`` with one-adapter steps folded into the base GEMMs (lora_fold.py; on by default on CUDA) or not,
``ours-fold-one`` without the several-adapter fold (lora_fold_multi.py), ``ours-fold-eager`` without CUDA graphs
(on a GPU, the several-adapter fold serves only steps without one: here, all of them).
Prints a table and writes mixed_check.json (``folded``, ``folded_several``: whether a variant's engine took the
one-adapter and the several-adapter fold path); exits 1 if
a variant of ours gives any request other tokens than alone, except where the alone run's two best tokens were
tied (``TIE_NATS``; the table shows the logprob gap where a mixed request parts from itself alone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serving.adapters import AdapterWriter  # noqa: E402
from bench.serving.model import write_model_dir  # noqa: E402

VARIANTS: dict[str, dict[str, str]] = {
    "vllm": {"VLLM_PLUGINS": "none-of-them"},  # a list that names no installed plugin: none is loaded
    "ours": {},
    "ours-vllm-grid": {"LORAFLEET_INFERENCE_LORA_TIGHT_GRID": "false"},
    "ours-fold": {"LORAFLEET_INFERENCE_LORA_FOLD": "true"},  # the default on CUDA; on the CPU build: asked for
    "ours-no-fold": {"LORAFLEET_INFERENCE_LORA_FOLD": "false"},
    # several adapters folded too (lora_fold_multi.py): on a GPU only in steps without a CUDA graph, so all of them
    "ours-fold-eager": {"LORAFLEET_INFERENCE_LORA_FOLD": "true", "LORAFLEET_INFERENCE_ENFORCE_EAGER": "true"},
    "ours-fold-one": {"LORAFLEET_INFERENCE_LORA_FOLD": "true", "LORAFLEET_INFERENCE_LORA_FOLD_RANK_BUDGET": "0"},
}
PROMPTS = {  # token ids of ordinary words: any fixed ids will do for a model of dummy weights
    "p1": [785, 3974, 13876, 38835, 34208, 916, 279, 15678, 5562, 13],
    "p2": [40, 1075, 311, 1349, 6467, 304, 279, 6556, 13, 576],
    "p3": [3838, 374, 279, 6722, 315, 9625, 30, 576, 6722, 374],
    "p4": [641, 279, 7167, 11, 1052, 572, 264, 3364, 315, 1657],
}
# (prompt, adapter or None for the base model): requests that start together and share their engine steps
MIXES = {
    "one adapter + base": [("p1", "a"), ("p3", None), ("p4", None)],
    "two adapters + base": [("p1", "a"), ("p2", "b"), ("p3", None)],
    "two adapters": [("p1", "a"), ("p2", "b")],
}
# each request alone, the base model's first: before any adapter is in a slot, they are the base model's for sure
ALONE = sorted(
    {request for mix in MIXES.values() for request in mix} | {("p1", None), ("p2", None)},
    key=lambda request: (request[1] is not None, str(request)),
)
MAX_TOKENS = 24
# The tiny model's dummy weights give nearly flat logits: two tokens can tie to the last bit of their logprobs, and
# a different but equally exact order of additions (the fold's one GEMM against vLLM's GEMM then LoRA kernels)
# breaks the tie the other way. A dropped adapter parts by whole nats, or with a token outside the top 2.
TIE_NATS = 1e-3


def key(request: tuple[str, str | None]) -> str:
    prompt, adapter = request
    return f"{prompt}@{adapter or 'base'}"


async def generate(
    engine: Any, requests: list[tuple[str, str | None]], adapters: dict[str, str]
) -> tuple[dict[str, list[int]], dict[str, list[dict[str, float]]]]:
    """Each request's tokens, and per position its top-2 tokens' logprobs (to tell a near-tie from a wrong step)."""
    from lorafleet_inference.engine import make_lora_request, make_sampling_params, token_prompt

    names = sorted(adapters)

    async def one(index: int, request: tuple[str, str | None]) -> tuple[list[int], list[dict[str, float]]]:
        prompt, adapter = request
        lora = make_lora_request(adapter, names.index(adapter) + 1, adapters[adapter]) if adapter else None
        params = make_sampling_params(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
        tokens: list[int] = []
        top: list[dict[str, float]] = []
        stream = engine.generate(
            token_prompt(PROMPTS[prompt]), params, f"r{time.monotonic_ns()}-{index}", lora_request=lora
        )
        async for output in stream:
            tokens.extend(output.outputs[0].token_ids)
            for position in output.outputs[0].logprobs or []:
                top.append({str(token): float(lp.logprob) for token, lp in position.items()})
        return tokens, top

    outputs = await asyncio.gather(*(one(i, request) for i, request in enumerate(requests)))
    tokens: dict[str, list[int]] = {}
    top: dict[str, list[dict[str, float]]] = {}
    for request, (request_tokens, request_top) in zip(requests, outputs, strict=True):
        tokens[key(request)], top[key(request)] = request_tokens, request_top
    return tokens, top


async def child_main(model_dir: str, adapters: dict[str, str], max_loras: int) -> dict[str, Any]:
    from lorafleet_inference.engine import build_engine, on_cuda
    from lorafleet_inference.settings import InferenceSettings

    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # as the replica: CUDA is already initialised here
    cuda = on_cuda()
    settings = InferenceSettings(
        max_loras=max_loras,
        max_lora_rank=16,
        max_model_len=256,
        max_num_seqs=8,
        load_format="dummy",
        dtype="bfloat16" if cuda else None,  # vLLM's GPU LoRA kernels take 16-bit activations
        gpu_memory_utilization=0.3 if cuda else None,
    )
    started = time.monotonic()
    engine = build_engine(settings, model_dir)
    result: dict[str, Any] = {"engine_start_s": round(time.monotonic() - started, 1), "cuda": cuda}
    try:
        alone: dict[str, list[int]] = {}
        alone_top: dict[str, list[dict[str, float]]] = {}
        for request in ALONE:
            tokens, top = await generate(engine, [request], adapters)
            alone |= tokens
            alone_top |= top
        result["alone"], result["alone_top2"] = alone, alone_top
        result["mixes"] = {name: (await generate(engine, mix, adapters))[0] for name, mix in MIXES.items()}
    finally:
        engine.shutdown()
    return result


def agreement(a: list[int], b: list[int]) -> int:
    """Tokens up to the first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def parting_gap(result: dict[str, Any], name: str, position: int, tokens: list[int]) -> float | None:
    """Where a mixed request parts from itself alone: how far below the alone run's token (in its logprobs) the
    mixed run's token was. A gap of a few hundredths is a near-tie flipped by rounding (a different but equally
    exact order of additions); a dropped adapter parts at the first token, by whole nats, or with a token outside
    the top 2 (None)."""
    top = result.get("alone_top2", {}).get(name, [])
    if position >= len(top):
        return None
    chosen, other = top[position].get(str(result["alone"][name][position])), top[position].get(str(tokens[position]))
    return None if chosen is None or other is None else round(chosen - other, 4)


def judge(result: dict[str, Any]) -> dict[str, Any]:
    """Per mixed request: tokens agreeing with the same request alone, and with its prompt on the base model."""
    alone, rows, right, right_up_to_ties = result["alone"], [], True, True
    for mix, outputs in result["mixes"].items():
        for name, tokens in outputs.items():
            prompt = name.split("@")[0]
            same = agreement(tokens, alone[name])
            rows.append(
                {"mix": mix, "request": name, "as_alone": same, "as_base": agreement(tokens, alone[f"{prompt}@base"])}
                | ({"gap_where_they_part": parting_gap(result, name, same, tokens)} if same < len(tokens) else {})
            )
            right &= same == len(tokens)
            gap = rows[-1].get("gap_where_they_part", 0.0)
            right_up_to_ties &= same == len(tokens) or (gap is not None and gap <= TIE_NATS)
    distinct = all(alone[f"{p}@{a}"] != alone[f"{p}@base"] for p, a in (("p1", "a"), ("p2", "b")))
    return {"rows": rows, "right": right, "right_up_to_ties": right_up_to_ties, "adapters_change_output": distinct}


def run_variant(name: str, work: Path, model_dir: Path, adapters: dict[str, str], args: argparse.Namespace) -> dict:
    out = work / f"{name}.json"
    env = os.environ | VARIANTS[name]
    command = [
        sys.executable,
        __file__,
        "--child",
        str(out),
        "--model-dir",
        str(model_dir),
        "--adapters",
        json.dumps(adapters),
    ]
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout_s, check=False)
    (work / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr[-2000:]}"}
    from lorafleet_inference.lora_fold import FIRST_FOLD_MESSAGE, MULTI_FOLD_MESSAGE

    logs = done.stdout + done.stderr
    result = json.loads(out.read_text()) | {
        "folded": FIRST_FOLD_MESSAGE in logs,
        "folded_several": MULTI_FOLD_MESSAGE in logs,
    }
    return result | judge(result) | {"wall_s": round(time.monotonic() - started, 1)}


def report(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| variant | mix | request | tokens as alone | tokens as base | where they part: logprob gap |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for variant, result in results.items():
        for row in result.get("rows", []):
            gap = row.get("gap_where_they_part", "")
            lines.append(
                f"| {variant} | {row['mix']} | {row['request']} | {row['as_alone']}/{MAX_TOKENS} | "
                f"{row['as_base']}/{MAX_TOKENS} | {'top-2 miss' if gap is None else gap} |"
            )
    done = [(name, result) for name, result in results.items() if "alone" in result]
    for name, result in done[1:]:  # the same requests alone, against the first variant's
        first_name, first = done[0]
        parts = {k: agreement(v, first["alone"][k]) for k, v in result["alone"].items()}
        lines.append(
            f"alone, {name} against {first_name}: " + ", ".join(f"{k} {n}/{MAX_TOKENS}" for k, n in parts.items())
        )
    for variant, result in results.items():
        verdict = result.get("error") or (
            (
                "right"
                if result["right"]
                else "right up to ties: a mixed request parts from itself alone only where two tokens were tied"
                if result["right_up_to_ties"]
                else "WRONG: a mixed request differs from the same request alone"
            )
            + ("" if result["adapters_change_output"] else " (inconclusive: an adapter did not change its output)")
        )
        lines.append(f"{variant}: {verdict}; engine start {result.get('engine_start_s')} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=None, help="folder for mixed_check.json and the variants' logs")
    parser.add_argument("--tokenizer-from", type=Path, default=None, help="a folder with the Qwen2.5 tokenizer files")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per variant")
    parser.add_argument(
        "--max-loras",
        type=int,
        default=4,
        help="adapter slots (on a GPU, 4 gives CUDA graphs for 1, 2, 4 and 5 adapters)",
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--adapters", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.child.write_text(
            json.dumps(asyncio.run(child_main(args.model_dir, json.loads(args.adapters), args.max_loras)))
        )
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {sorted(unknown)}")
    work = args.out or Path(tempfile.mkdtemp(prefix="lora-mixed-"))
    work.mkdir(parents=True, exist_ok=True)
    files = Path(tempfile.mkdtemp(prefix="lora-mixed-model-"))  # not under --out: the results come back, not these
    model_dir = write_model_dir(files / "model", "tiny-qwen2", tokenizer_from=args.tokenizer_from)
    writer = AdapterWriter(model_dir, dtype="bfloat16")
    adapters = {name: str(writer.write(files / f"adapter-{name}", 16, str(model_dir), b_scale=0.5)) for name in "ab"}
    results = {name: run_variant(name, work, model_dir, adapters, args) for name in variants}
    (work / "mixed_check.json").write_text(json.dumps(results, indent=1))
    print(report(results))
    ours = [r for name, r in results.items() if name != "vllm"]
    sys.exit(0 if all(r.get("right_up_to_ties") and r.get("adapters_change_output") for r in ours) else 1)


if __name__ == "__main__":
    main()
