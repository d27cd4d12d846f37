"""Trainer benchmark: our LoRA train loop against a plain transformers + peft loop, same run, same everything.

One process, one base model with one LoRA adapter (the manifest's shape: all-linear, r 8, alpha 32, no
dropout), the same synthetic rows (random token ids; lengths log-normal around seq_len/5, clipped to
[16, seq_len]; the first 30-70% of each row is prompt, masked), one timed epoch per case after an untimed one,
a fresh AdamW for each case:

  hf+peft           padded batches of --batch-size rows in random order, ``model(..., labels=...).loss``
                    (the usual transformers recipe: the vocabulary projection on every position)
  ours              ``train_loop.train``: length-grouped padded batches, the vocabulary projection on
                    labelled positions only, the loss summed over the step's labelled tokens
  ours packed       the same with ``training.packing``: rows packed into sequences of --seq-len tokens,
                    --packed-batch-size of them per forward, no attention across rows
  "+gc": with gradient checkpointing (non-reentrant)

tokens/s: the rows' real (non-padding) tokens over the epoch's wall time, the same count for every case.
peak memory: CUDA max_memory_allocated during the case; on CPU the process's peak RSS (VmHWM, reset per
case; it includes the model). MFU = 4 * N_matmul * tokens/s / peak FLOP/s, where N_matmul counts the
weights of every matmul (base linears, LoRA A and B, lm_head; not the embedding lookup, not attention
scores). 4N per token = 2N forward + 2N for the input gradients in the backward pass; the frozen base
weights get no weight gradients (only LoRA's, which are ~0.3% of N), so the usual 6N would overstate
the work. Recomputation under gradient checkpointing is not counted (model FLOPs, not hardware FLOPs).

    python bench/trainer.py --smoke                          # CPU, embedded SmolLM2-135M, under a minute
    python bench/trainer.py                                  # CPU, embedded model, more rows
    python bench/trainer.py --model qwen2.5-7b --seq-len 2048    # GPU: Qwen2.5-7B shape, random bf16 weights
    python bench/trainer.py --model /models/qwen2.5-7b --seq-len 512   # GPU, real weights
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import re
import sys
import time
from collections.abc import Callable
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Any

import torch
from serving.model import QWEN25_7B  # bench/ is on sys.path: this file runs as a script

from lorafleet_trainer import train_loop
from lorafleet_trainer.manifest import LoraSpec, TrainingSpec
from lorafleet_trainer.tokenize import IGNORE_INDEX, TokenizedExample

CASES = [  # (name, our loop?, packing, gradient checkpointing)
    ("hf+peft", False, False, False),
    ("hf+peft +gc", False, False, True),
    ("ours", True, False, False),
    ("ours +gc", True, False, True),
    ("ours packed", True, True, False),
    ("ours packed +gc", True, True, True),
]


def synthetic_rows(count: int, seq_len: int, vocab: int, seed: int) -> list[TokenizedExample]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        n = min(seq_len, max(16, round(rng.lognormvariate(math.log(seq_len / 5), 0.6))))
        ids = [rng.randrange(100, vocab) for _ in range(n)]
        prompt = round(n * rng.uniform(0.3, 0.7))
        rows.append(TokenizedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return rows


def matmul_weights(model: Any) -> int:
    """Weights that take part in a matmul per token: every nn.Linear (base, LoRA A/B, lm_head)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def load_model(args: argparse.Namespace, device: torch.device, lora: LoraSpec) -> tuple[Any, str]:
    if args.model is None:
        from lorafleet_common.embedded_model import prepare_embedded_model

        home = Path(os.environ.get("LORAFLEET_HOME") or Path.cwd() / ".lorafleet")
        path = str(prepare_embedded_model(home / "models"))
        return train_loop.load_lora_model(path, lora, 0, device, local_only=True), "SmolLM2-135M-Instruct (embedded)"
    if not (args.dummy or args.model == "qwen2.5-7b"):
        return train_loop.load_lora_model(args.model, lora, 0, device, local_only=True), args.model
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**QWEN25_7B) if args.model == "qwen2.5-7b" else AutoConfig.from_pretrained(args.model)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the weights directly in the training dtype, on the device
    try:
        with device:
            # dtype explicitly: the architecture's config names bfloat16, the run's dtype wins (fp32 on CPU).
            base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    return train_loop.add_lora(base, lora, 0), f"{args.model} (random weights)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)


def peak_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def hf_peft_epoch(model: Any, rows: list[TokenizedExample], args: argparse.Namespace, device: torch.device) -> None:
    """The plain transformers + peft loop: random batches padded to their longest row, HF's own loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    order = list(range(len(rows)))
    random.Random(1).shuffle(order)
    batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    model.train()
    for start in range(0, len(batches), args.grad_accum):
        group = batches[start : start + args.grad_accum]
        for batch in group:
            width = max(len(rows[i].input_ids) for i in batch)
            ids = torch.full((len(batch), width), args.pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, i in enumerate(batch):
                n = len(rows[i].input_ids)
                ids[b, :n], labels[b, :n], mask[b, :n] = (
                    torch.tensor(rows[i].input_ids),
                    torch.tensor(rows[i].labels),
                    1,
                )
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
            (out.loss / len(group)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def our_epoch(model: Any, rows: list[TokenizedExample], training: TrainingSpec, args: argparse.Namespace) -> None:
    train_loop.train(model, rows, training, args.pad_id, lambda report: None, args.device)


def run_case(
    name: str, epoch: Callable[[list[TokenizedExample]], None], rows: list[TokenizedExample], args: argparse.Namespace
) -> dict[str, Any]:
    device = args.device
    reset_peak(device)
    try:
        epoch(rows[: args.warmup_rows])  # every batch shape once: kernels, allocator, autotuning
        sync(device)
        reset_peak(device)
        began = time.perf_counter()
        epoch(rows)
        sync(device)
        seconds = time.perf_counter() - began
    except torch.OutOfMemoryError as exc:
        error = str(exc).splitlines()[0][:200]
    else:
        error = ""
    if error:  # out of the except block, so the failed step's tensors can be freed
        print(f"  {name}: out of memory ({error})", file=sys.stderr, flush=True)
        peak = peak_bytes(device)
        for param in args.trainable:
            param.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"case": name, "seconds": None, "tok_s": None, "peak_bytes": peak, "mfu": None, "oom": True}
    tokens = sum(len(r.input_ids) for r in rows)
    tok_s = tokens / seconds
    mfu = 4 * args.n_matmul * tok_s / args.peak_flops if args.peak_flops else None
    result = {"case": name, "seconds": seconds, "tok_s": tok_s, "peak_bytes": peak_bytes(device), "mfu": mfu}
    print(f"  {name}: {tok_s:.1f} tok/s", file=sys.stderr, flush=True)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.device = train_loop.pick_device()
    lora = LoraSpec(rank=args.rank, alpha=args.alpha, dropout=0.0)
    model, args.model_label = load_model(args, args.device, lora)
    vocab = model.get_base_model().config.vocab_size
    args.pad_id = 0
    args.n_matmul = matmul_weights(model)
    args.trainable = [p for p in model.parameters() if p.requires_grad]
    if args.peak_flops is None and args.device.type == "cuda":
        args.peak_flops = 989e12
    rows = synthetic_rows(args.rows, args.seq_len, min(vocab, 150_000), seed=0)
    results = []
    for name, ours, packing, gc in CASES:
        if ours:
            training = TrainingSpec(
                epochs=1,
                batch_size=args.packed_batch_size if packing else args.batch_size,
                gradient_accumulation_steps=args.grad_accum,
                max_length=args.seq_len,
                warmup_ratio=0.0,
                packing=packing,
                gradient_checkpointing=gc,
            )

            def epoch(data: list[TokenizedExample], training: TrainingSpec = training) -> None:
                our_epoch(model, data, training, args)
        else:

            def epoch(data: list[TokenizedExample], gc: bool = gc) -> None:
                train_loop.set_gradient_checkpointing(model, gc)
                hf_peft_epoch(model, data, args, args.device)

        results.append(run_case(name, epoch, rows, args))
    lengths = sorted(len(r.input_ids) for r in rows)
    return {
        "cases": results,
        "rows": len(rows),
        "tokens": sum(lengths),
        "length_p50": lengths[len(lengths) // 2],
        "length_max": lengths[-1],
        "packs": len(train_loop.pack_rows(lengths, args.seq_len)),
        "n_matmul": args.n_matmul,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def report(args: argparse.Namespace, r: dict[str, Any]) -> str:
    device = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    dtype = "bf16" if args.device.type == "cuda" else "fp32"
    versions = ", ".join(f"{p} {pkg_metadata.version(p)}" for p in ("torch", "transformers", "peft"))
    peak = f"{args.peak_flops / 1e12:.0f} TFLOP/s" if args.peak_flops else "none given: MFU n/a"
    lines = [
        f"model {args.model_label}, {dtype}, {device} ({platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads), {versions}",
        f"LoRA r{args.rank} alpha {args.alpha:g} all-linear: {r['trainable'] / 1e6:.2f} M trainable; "
        f"N_matmul {r['n_matmul'] / 1e9:.3f} B",
        f"data: {r['rows']} rows, {r['tokens']} tokens (length p50 {r['length_p50']}, max {r['length_max']}), "
        f"seq_len {args.seq_len} ({r['packs']} packs); batch {args.batch_size} rows / {args.packed_batch_size} "
        f"packs, accumulation {args.grad_accum}, one epoch after a {args.warmup_rows or r['rows']}-row warm-up",
        f"MFU = 4 * N_matmul * tokens/s / peak FLOP/s (peak: {peak}); 4N = 2N forward + 2N input gradients "
        "(frozen base: no weight gradients); recomputation not counted",
        "",
        f"{'case':<18}{'tokens/s':>10}{'peak mem GiB':>14}{'MFU':>8}{'speed vs hf':>13}{'mem vs hf':>11}",
    ]
    by_name = {c["case"]: c for c in r["cases"]}
    for case in r["cases"]:
        base = by_name["hf+peft +gc" if case["case"].endswith("+gc") else "hf+peft"]
        mem = f"{case['peak_bytes'] / 2**30:.2f}" if case["peak_bytes"] else "n/a"
        if case["tok_s"] is None:
            lines.append(f"{case['case']:<18}{'OOM':>10}{'>' + mem:>14}")
            continue
        mem_ratio = (
            f"{case['peak_bytes'] / base['peak_bytes']:.2f}" if case["peak_bytes"] and base["peak_bytes"] else "n/a"
        )
        mfu = f"{case['mfu']:.1%}" if case["mfu"] is not None else "n/a"
        speed = f"{case['tok_s'] / base['tok_s']:.2f}" if base["tok_s"] else "n/a"
        lines.append(f"{case['case']:<18}{case['tok_s']:>10.1f}{mem:>14}{mfu:>8}{speed:>13}{mem_ratio:>11}")
    lines.append("(ratios against hf+peft with the same gradient checkpointing setting)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or hub id, or 'qwen2.5-7b' (default: the embedded SmolLM2-135M)")
    parser.add_argument("--dummy", action="store_true", help="random weights from the model's config")
    parser.add_argument("--seq-len", type=int, default=256, help="max_length and pack size (default 256)")
    parser.add_argument("--rows", type=int, default=48, help="training rows (default 48)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per forward when padded (default 4)")
    parser.add_argument("--packed-batch-size", type=int, default=1, help="packs per forward (default 1)")
    parser.add_argument("--grad-accum", type=int, default=2, help="forwards per optimizer step (default 2)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument(
        "--warmup-rows", type=int, default=None, help="rows of each case's untimed warm-up epoch (default: all)"
    )
    parser.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s for MFU (CUDA default 989e12)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; --smoke: 1)")
    parser.add_argument("--smoke", action="store_true", help="tiny run for the test suite (CPU: under a minute)")
    parser.add_argument("--json-out", type=Path, help="also write the raw results as JSON here")
    args = parser.parse_args()
    if args.smoke:
        args.seq_len, args.rows, args.batch_size, args.grad_accum, args.warmup_rows = 64, 6, 2, 1, 2
        # One thread: on a busy shared CPU, two OpenMP threads wait on each other at every small op.
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args)
    print(report(args, results))
    if args.json_out:
        settings = {k: v for k, v in vars(args).items() if k not in ("device", "json_out", "trainable")}
        args.json_out.write_text(json.dumps({"args": settings, "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
