"""Trainer benchmark: our LoRA train loop against a plain transformers + peft loop, same run, same everything.

One process, one base model with one LoRA adapter (the manifest's shape: all-linear, r 8, alpha 32, no
dropout), the same synthetic rows (random token ids; lengths log-normal around seq_len/5, clipped to
[16, seq_len]; the first 30-70% of each row is prompt, masked), one timed epoch per case after an untimed
warm-up, a fresh AdamW for each case. A case is named by words (``--cases``, comma-separated):

  hf+peft           padded batches of --batch-size rows in random order, ``model(..., labels=...).loss``
                    (the usual transformers recipe: the vocabulary projection on every position), PEFT's own
                    LoRA forward, sdpa with the padding mask, torch's default AdamW
  ours              ``train_loop.train``, the code a job runs: length-grouped padded batches, the vocabulary
                    projection on labelled positions only (in chunks), the lean LoRA forward with projection
                    groups, fused AdamW
  packed            ``training.packing``: rows packed into sequences of --seq-len tokens, no attention across
                    rows (CUDA: torch's varlen flash attention when this torch has it, else sdpa and a 4D mask)
  xN                N rows (padded) or N packs (packed) per forward instead of --batch-size / --packed-batch-size
  +gc               gradient checkpointing (non-reentrant)
  nf4               QLoRA: the base quantized to 4-bit NF4 with bitsandbytes (``lora.quantization: nf4``; CUDA)
  capN              the CUDA caching allocator capped at N GB (10^9 bytes) for the case: it fails rather than
                    use more, so a case that runs is shown to fit (e.g. a 24 GB card's budget: cap22)
  peft-fwd, mask    ablations of ours: PEFT's own LoRA forward; sdpa with the 4D mask instead of varlen
  nogroup           ablation of ours: each LoRA layer through the lean forward alone, no projection groups
                    (lora_groups.py: q/k/v and gate/up as one augmented GEMM each)
  nofuse            ablation of ours: lean layers without the fused backward (lora_forward.py's ``_LoraLinear``);
                    ``nogroup nofuse`` is the loop as it was before both
  +compile          ``training.compile``: the decoder layers through torch.compile (--compile-backend, default
                    inductor); the warm-up epoch then runs on all rows, so that it compiles every shape the timed
                    epoch meets, and the compilation's own time is reported (compile_s, graphs)

--profile [CASES]: after a case's timed epoch, 3 of its micro-batches again, timed (wall and host issue time per
micro-batch, host-device syncs) and under torch.profiler (GPU kernel time, so GPU busy = kernels / wall, and the top
ops); for every case, or the comma-separated ones named (bench/training/profiling.py).

tokens/s: the rows' real (non-padding) tokens over the epoch's wall time, the same count for every case.
peak memory: CUDA max_memory_allocated during the case (and max_memory_reserved, what the card must hold);
on CPU the process's peak RSS (VmHWM, reset per case; it includes the model). MFU = 4 * N_matmul * tokens/s /
peak FLOP/s, where N_matmul counts the weights of every matmul (base linears, LoRA A and B, lm_head; not the
embedding lookup, not attention scores). 4N per token = 2N forward + 2N for the input gradients in the backward
pass; the frozen base weights get no weight gradients (only LoRA's, ~0.3% of N), so the usual 6N would
overstate the work. Recomputation under gradient checkpointing is not counted (model FLOPs, not hardware FLOPs).
Two peaks: the datasheet's (--peak-flops; on CUDA 989 TFLOP/s, an H100 SXM's dense bf16), column MFU; and, with
--measure-peak (the default on CUDA), the best bf16 matmul rate measured on this device before the cases
(training/matmul_peak.py), column "MFU meas", the denominator issue #8 states.

    python bench/trainer.py --smoke                          # CPU, embedded SmolLM2-135M, under a minute
    python bench/trainer.py --model qwen2.5-7b --seq-len 2048 --cases 'hf+peft +gc,ours packed x4 +gc cap22'
    python bench/trainer.py --model /models/qwen2.5-7b --seq-len 512   # GPU, real weights
    python bench/trainer.py --model qwen2.5-7b --seq-len 2048 --cases 'ours packed x2,ours packed x2 +compile' --profile
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Any

import torch
from serving.model import QWEN25_7B  # bench/ is on sys.path: this file runs as a script
from training.matmul_peak import measure_matmul_peak
from training.profiling import profile_micro_batches, report_lines
from training.random_weights import random_weights

from lorafleet_trainer import train_loop
from lorafleet_trainer.attention import VARLEN_ATTENTION
from lorafleet_trainer.compiled_layers import CACHE_ATTRIBUTE, CompiledLayers, compiled_layers
from lorafleet_trainer.lora_forward import set_fused_lora_backward, set_lean_lora_forward
from lorafleet_trainer.lora_groups import group_lora_projections, ungroup_lora_projections, uses_lora_groups
from lorafleet_trainer.manifest import LoraSpec, TrainingSpec
from lorafleet_trainer.tokenize import IGNORE_INDEX, TokenizedExample

DEFAULT_CASES = ["hf+peft", "hf+peft +gc", "ours", "ours +gc", "ours packed", "ours packed +gc"]
# dynamo's timers that add up to compilation: tracing and forward compilation, and backward graphs compiled lazily
COMPILE_METRICS = ("_compile.compile_inner", "backward._backward_impl")
CASE_WORDS = re.compile(
    r"^(hf\+peft|ours)((?: (?:packed|x\d+|\+gc|\+compile|nf4|cap\d+(?:\.\d+)?|peft-fwd|mask|nogroup|nofuse))*)$"
)


@dataclass(frozen=True)
class Case:
    name: str
    ours: bool
    packing: bool
    per_forward: int | None  # rows or packs per forward; None: the command line's
    gc: bool
    nf4: bool
    cap_gb: float | None
    peft_forward: bool
    mask: bool
    compile: bool = False
    groups: bool = True
    fused_backward: bool = True

    @property
    def baseline(self) -> str:
        """The hf+peft case this one is compared with: same checkpointing, same quantization."""
        return "hf+peft" + (" +gc" if self.gc else "") + (" nf4" if self.nf4 else "")


def parse_case(name: str) -> Case:
    match = CASE_WORDS.match(name.strip())
    if not match:
        raise SystemExit(
            f"unknown case {name!r}: 'hf+peft' or 'ours', then any of packed, xN, +gc, +compile, nf4, capN, "
            "peft-fwd, mask, nogroup, nofuse"
        )
    words = match.group(2).split()
    ours = match.group(1) == "ours"
    if not ours and {"packed", "peft-fwd", "mask", "+compile", "nogroup", "nofuse"} & set(words):
        raise SystemExit(f"case {name!r}: packed, +compile, peft-fwd, mask, nogroup, nofuse are variants of 'ours'")
    sizes = [int(w[1:]) for w in words if w.startswith("x")]
    caps = [float(w[3:]) for w in words if w.startswith("cap")]
    return Case(
        name=name.strip(),
        ours=ours,
        packing="packed" in words,
        per_forward=sizes[-1] if sizes else None,
        gc="+gc" in words,
        nf4="nf4" in words,
        cap_gb=caps[-1] if caps else None,
        peft_forward="peft-fwd" in words,
        mask="mask" in words,
        compile="+compile" in words,
        groups="nogroup" not in words and "peft-fwd" not in words,
        fused_backward="nofuse" not in words,
    )


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
    """Weights that take part in a matmul per token: every nn.Linear (base, LoRA A/B, lm_head), 4-bit ones too."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def model_folder(args: argparse.Namespace) -> tuple[str, bool, str]:
    """(folder, random weights?, label) for --model."""
    if args.model is None:
        from lorafleet_common.embedded_model import prepare_embedded_model

        home = Path(os.environ.get("LORAFLEET_HOME") or Path.cwd() / ".lorafleet")
        return str(prepare_embedded_model(home / "models")), args.dummy, "SmolLM2-135M-Instruct (embedded)"
    if args.model == "qwen2.5-7b":
        folder = Path(tempfile.mkdtemp(prefix="qwen25-7b-config-"))
        (folder / "config.json").write_text(json.dumps(QWEN25_7B))
        return str(folder), True, "Qwen2.5-7B shape (random weights)"
    return args.model, args.dummy, args.model + (" (random weights)" if args.dummy else "")


def load_model(args: argparse.Namespace, lora: LoraSpec) -> Any:
    """Our loader (``train_loop.load_lora_model``), with random weights made on the device when asked."""
    folder, dummy, args.model_label = model_folder(args)
    began = time.perf_counter()
    with random_weights(args.device) if dummy else contextlib.nullcontext():
        model = train_loop.load_lora_model(folder, lora, 0, args.device, local_only=True)
    sync(args.device)
    args.load_seconds.append(round(time.perf_counter() - began, 2))
    return model


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def peak_bytes(device: torch.device) -> tuple[int | None, int | None]:
    """(peak allocated, peak reserved) on CUDA; (peak RSS, None) on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), int(torch.cuda.max_memory_reserved(device))
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None, None
    return (int(match.group(1)) * 1024 if match else None), None


@contextlib.contextmanager
def memory_cap(device: torch.device, cap_gb: float | None) -> Any:
    """Cap the caching allocator at ``cap_gb`` GB: allocations beyond it fail as on a card of that size."""
    if cap_gb is None or device.type != "cuda":
        yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()  # the call wants an index
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 1e9 / total), index)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)


@contextlib.contextmanager
def plain_peft(model: Any, lora_forward: bool, attention: bool, groups: bool = False, fused: bool = True) -> Any:
    """PEFT's own LoRA forward and/or sdpa with explicit masks, for the baseline and the ablations; the projection
    groups only where ``groups`` (and not with PEFT's forward), the lean layers' fused backward only where ``fused``."""
    base = model.get_base_model()
    implementation = str(base.config._attn_implementation)
    grouped = uses_lora_groups(model)
    if grouped and (lora_forward or not groups):
        ungroup_lora_projections(model)
    if lora_forward:
        set_lean_lora_forward(model, False)
    set_fused_lora_backward(model, fused)
    if attention and implementation == VARLEN_ATTENTION:
        base.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        set_fused_lora_backward(model, True)
        if lora_forward:
            set_lean_lora_forward(model, True)
        if grouped and not uses_lora_groups(model):
            group_lora_projections(model)
        if base.config._attn_implementation != implementation:
            base.set_attn_implementation(implementation)


def hf_peft_epoch(model: Any, rows: list[TokenizedExample], args: argparse.Namespace, batch_size: int) -> None:
    """The plain transformers + peft loop: random batches padded to their longest row, HF's own loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    order = list(range(len(rows)))
    random.Random(1).shuffle(order)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
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
            device = args.device
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
            (out.loss / len(group)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def case_training(case: Case, args: argparse.Namespace) -> TrainingSpec:
    """The manifest's training section of an 'ours' case: one epoch, no warm-up ratio."""
    default = args.packed_batch_size if case.packing else args.batch_size
    return TrainingSpec(
        epochs=1,
        batch_size=case.per_forward or default,
        gradient_accumulation_steps=args.grad_accum,
        max_length=args.seq_len,
        warmup_ratio=0.0,
        packing=case.packing,
        gradient_checkpointing=case.gc,
        compile=case.compile,
    )


def fresh_compilation_for_variant(model: Any, case: Case) -> None:
    """A +compile case whose LoRA code path differs from the last compiled one's starts from nothing: dynamo does not
    guard the modules' plain attributes (the ablations' switches), so it would reuse the other path's graphs."""
    variant = (case.peft_forward, case.groups, case.fused_backward, case.mask)
    base = model.get_base_model()
    if base.__dict__.get("_bench_compiled_variant", variant) != variant:
        torch._dynamo.reset()
        base.__dict__.pop(CACHE_ATTRIBUTE, None)  # compiled_layers.py's per-model cache
    base.__dict__["_bench_compiled_variant"] = variant


def case_epoch(case: Case, model: Any, args: argparse.Namespace) -> Callable[[list[TokenizedExample]], None]:
    if not case.ours:
        batch_size = case.per_forward or args.batch_size

        def hf_epoch(data: list[TokenizedExample]) -> None:
            with plain_peft(model, lora_forward=True, attention=True):
                train_loop.set_gradient_checkpointing(model, case.gc)
                hf_peft_epoch(model, data, args, batch_size)

        return hf_epoch
    training = case_training(case, args)
    if case.compile:
        fresh_compilation_for_variant(model, case)

    def our_epoch(data: list[TokenizedExample]) -> None:
        with plain_peft(
            model, lora_forward=case.peft_forward, attention=case.mask, groups=case.groups, fused=case.fused_backward
        ):
            train_loop.train(
                model,
                data,
                training,
                args.pad_id,
                lambda report: None,
                args.device,
                compile_backend=args.compile_backend,
            )

    return our_epoch


def compilation_totals() -> tuple[float, int]:
    """(seconds spent compiling, graphs compiled) so far in this process: dynamo's tracing and the backend's
    compilation of forward graphs, and the backward graphs compiled at their first use."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    seconds = sum(sum(times) for key, times in compilation_time_metrics.items() if key in COMPILE_METRICS)
    return seconds, int(counters["stats"]["unique_graphs"])


def compiled_layers_of(model: Any, case: Case, args: argparse.Namespace) -> CompiledLayers | None:
    """The compiled layers a case's train() used (made once per model and shape policy)."""
    return compiled_layers(model, packed=case.packing, backend=args.compile_backend)


def profile_case(case: Case, model: Any, rows: list[TokenizedExample], args: argparse.Namespace) -> dict[str, Any]:
    if not case.ours:
        return {"error": "only 'ours' cases are profiled"}
    try:
        with plain_peft(
            model, lora_forward=case.peft_forward, attention=case.mask, groups=case.groups, fused=case.fused_backward
        ):
            return profile_micro_batches(
                model, rows, case_training(case, args), args.pad_id, args.device, compile_backend=args.compile_backend
            )
    except Exception as exc:  # the profile is extra: the case's timing stands without it
        traceback.print_exc()
        model.zero_grad(set_to_none=True)
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def run_case(case: Case, model: Any, rows: list[TokenizedExample], args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    epoch = case_epoch(case, model, args)
    reset_peak(device)
    error = ""
    profiled: dict[str, Any] | None = None
    # A compiled case warms up on every row: every shape of the timed epoch (an epoch's last micro-batch) compiled.
    warmup_rows = rows if case.compile else rows[: args.warmup_rows]
    compiled_before = compilation_totals() if case.compile else (0.0, 0)
    try:
        with memory_cap(device, case.cap_gb):
            warmup_began = time.perf_counter()
            epoch(warmup_rows)  # kernels, allocator, autotuning, compilation
            sync(device)
            warmup_seconds = time.perf_counter() - warmup_began
            compiled_after = compilation_totals() if case.compile else (0.0, 0)
            reset_peak(device)
            began = time.perf_counter()
            epoch(rows)
            sync(device)
            seconds = time.perf_counter() - began
            compiled_timed = compilation_totals() if case.compile else (0.0, 0)
            if compiled_timed[1] != compiled_after[1]:
                print(f"  {case.name}: the timed epoch compiled more graphs", file=sys.stderr, flush=True)
            if args.profile is not None and (not args.profile or case.name in args.profile):
                profiled = profile_case(case, model, rows, args)
    except torch.OutOfMemoryError as exc:
        error = "out of memory: " + str(exc).splitlines()[0][:200]
    except Exception as exc:  # one broken case must not cost the others (a device call is scarce)
        traceback.print_exc()
        error = f"{type(exc).__name__}: {str(exc)[:300]}"
    peak, reserved = peak_bytes(device)
    result: dict[str, Any] = {"case": case.name, "peak_bytes": peak, "reserved_bytes": reserved, "cap_gb": case.cap_gb}
    if profiled is not None:
        result["profile"] = profiled
    if error:  # out of the except block, so the failed step's tensors can be freed
        print(f"  {case.name}: {error}", file=sys.stderr, flush=True)
        for param in model.parameters():
            param.grad = None
        release_memory(device)
        return result | {"seconds": None, "tok_s": None, "mfu": None, "mfu_measured": None, "error": error}
    tokens = sum(len(r.input_ids) for r in rows)
    tok_s = tokens / seconds
    mfu = 4 * args.n_matmul * tok_s / args.peak_flops if args.peak_flops else None
    measured = args.measured_peak["peak_flops"] if args.measured_peak else None
    mfu_measured = 4 * args.n_matmul * tok_s / measured if measured else None
    print(f"  {case.name}: {tok_s:.1f} tok/s, peak {(peak or 0) / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    result |= {"seconds": seconds, "tok_s": tok_s, "mfu": mfu, "mfu_measured": mfu_measured, "warmup_s": warmup_seconds}
    if case.compile:
        result |= {
            "compile_s": compiled_after[0] - compiled_before[0],
            "graphs": compiled_after[1] - compiled_before[1],
            "graphs_in_timed_epoch": compiled_timed[1] - compiled_after[1],
            # a compilation failure leaves a warning and an eager run: say so next to the numbers
            "compile_failure": getattr(compiled_layers_of(model, case, args), "failure", None),
        }
    return result


def packing_check(model: Any, rows: list[TokenizedExample], args: argparse.Namespace) -> dict[str, Any]:
    """One pack of several rows against the same rows padded, on this model and device: loss and LoRA-B gradient
    differences, for the attention path the packed cases use and, as the control, plain causal attention across
    the rows (what a leak would look like)."""
    pack = next((p for p in train_loop.pack_rows([len(r.input_ids) for r in rows], args.seq_len) if len(p) > 2), None)
    if pack is None:
        return {"skipped": "no pack of 3 or more rows"}
    chosen = [rows[i] for i in pack]
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]

    def loss_and_grad(batch: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss = train_loop.micro_batch_loss_sum(model, batch)
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.float().flatten() for _, p in params])

    model.eval()
    train_loop.set_gradient_checkpointing(model, False)
    padded = loss_and_grad(train_loop.collate([[r] for r in chosen], args.pad_id, args.device))
    packed_batch = train_loop.collate([chosen], args.pad_id, args.device)
    packed = loss_and_grad(packed_batch)
    leaky_batch = {k: packed_batch[k] for k in ("input_ids", "labels")}
    leaky_batch["attention_mask"] = torch.ones_like(packed_batch["input_ids"])
    leaky = loss_and_grad(leaky_batch)
    model.zero_grad(set_to_none=True)

    def diff(other: tuple[float, torch.Tensor]) -> dict[str, float]:
        grad = float((other[1] - padded[1]).norm() / padded[1].norm().clamp_min(1e-30))
        return {"loss_rel": abs(other[0] - padded[0]) / abs(padded[0]), "grad_rel": grad}

    attention = str(model.get_base_model().config._attn_implementation)
    return {
        "rows": len(chosen),
        "tokens": sum(len(r.input_ids) for r in chosen),
        "attention": attention,
        "packed_vs_padded": diff(packed),
        "leaky_vs_padded": diff(leaky),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.device = train_loop.pick_device()
    args.load_seconds = []
    lora = LoraSpec(rank=args.rank, alpha=args.alpha, dropout=0.0)
    cases = [parse_case(name) for name in args.cases]
    if args.peak_flops is None and args.device.type == "cuda":
        args.peak_flops = 989e12
    if args.measure_peak is None:
        args.measure_peak = args.device.type == "cuda"
    # Before any model is on the device: the GEMMs have the GPU (and its memory) to themselves.
    args.measured_peak = None
    if args.measure_peak:
        try:
            args.measured_peak = measure_matmul_peak(args.device)
        except Exception:  # the cases still run (a device call is scarce); MFU meas is then n/a
            traceback.print_exc()
            release_memory(args.device)
    if args.measured_peak:
        best = args.measured_peak["peak_flops"]
        print(f"measured matmul peak: {best / 1e12:.1f} TFLOP/s", file=sys.stderr, flush=True)
    results: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    rows: list[TokenizedExample] = []
    for quantized in (False, True):  # the bf16 base first, then (its memory freed) the 4-bit one
        group = [c for c in cases if c.nf4 == quantized]
        if not group:
            continue
        spec = lora.model_copy(update={"quantization": "nf4" if quantized else "none"})
        try:
            model = load_model(args, spec)
        except train_loop.QuantizationUnavailable as exc:
            results += [{"case": c.name, "skipped": str(exc)} for c in group]
            continue
        except Exception as exc:  # e.g. bitsandbytes failing to load: the other group's cases still count
            traceback.print_exc()
            results += [{"case": c.name, "skipped": f"model: {type(exc).__name__}: {exc}"} for c in group]
            release_memory(args.device)
            continue
        vocab = model.get_base_model().config.vocab_size
        args.pad_id = 0
        if not rows:
            rows = synthetic_rows(args.rows, args.seq_len, min(vocab, 150_000), seed=0)
        key = "nf4" if quantized else "base"
        info[key] = {
            "n_matmul": matmul_weights(model),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "attention": str(model.get_base_model().config._attn_implementation),
            "load_seconds": args.load_seconds[-1],
            "weights_bytes": torch.cuda.memory_allocated(args.device) if args.device.type == "cuda" else None,
        }
        args.n_matmul = info["base" if "base" in info else key]["n_matmul"]  # MFU counts the same work for both
        if args.check_packing:
            try:
                info[key]["packing_check"] = packing_check(model, rows, args)
            except Exception as exc:
                traceback.print_exc()
                info[key]["packing_check"] = {"error": f"{type(exc).__name__}: {exc}"}
                model.zero_grad(set_to_none=True)
        for case in group:
            results.append(run_case(case, model, rows, args))
            if args.json_out:  # what is done so far survives a call that runs out of time
                partial = {"partial": True, "cases": results, "models": info}
                args.json_out.write_text(json.dumps({"results": partial}, indent=2, default=str))
        del model  # before the next group's model is built
        release_memory(args.device)
    lengths = sorted(len(r.input_ids) for r in rows)
    order = {name: i for i, name in enumerate(args.cases)}
    results.sort(key=lambda r: order[r["case"]])
    return {
        "cases": results,
        "rows": len(rows),
        "tokens": sum(lengths),
        "length_p50": lengths[len(lengths) // 2] if lengths else 0,
        "length_max": lengths[-1] if lengths else 0,
        "packs": len(train_loop.pack_rows(lengths, args.seq_len)),
        "models": info,
        "n_matmul": (info.get("base") or info.get("nf4") or {}).get("n_matmul", 0),
        "measured_peak": args.measured_peak,
        "trainable": (info.get("base") or info.get("nf4") or {}).get("trainable", 0),
    }


def report(args: argparse.Namespace, r: dict[str, Any]) -> str:
    device = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    dtype = "bf16" if args.device.type == "cuda" else "fp32"
    versions = ", ".join(f"{p} {pkg_metadata.version(p)}" for p in ("torch", "transformers", "peft"))
    peak = f"{args.peak_flops / 1e12:.0f} TFLOP/s" if args.peak_flops else "none given: MFU n/a"
    measured = r.get("measured_peak")
    if measured:
        shapes = ", ".join(f"{s['m']}x{s['k']}x{s['n']} {s['flops_per_s'] / 1e12:.1f}" for s in measured["shapes"])
        peak += (
            f"; MFU meas: over the measured {measured['dtype']} matmul peak, {measured['peak_flops'] / 1e12:.1f} "
            f"TFLOP/s (best of M x K x N: {shapes})"
        )
    lines = [
        f"model {args.model_label}, {dtype}, {device} ({platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads), {versions}",
        f"LoRA r{args.rank} alpha {args.alpha:g} all-linear: {r['trainable'] / 1e6:.2f} M trainable; "
        f"N_matmul {r['n_matmul'] / 1e9:.3f} B",
        f"data: {r['rows']} rows, {r['tokens']} tokens (length p50 {r['length_p50']}, max {r['length_max']}), "
        f"seq_len {args.seq_len} ({r['packs']} packs); batch {args.batch_size} rows / {args.packed_batch_size} "
        f"packs (xN: N), accumulation {args.grad_accum}, one epoch after a {args.warmup_rows or r['rows']}-row warm-up",
        f"MFU = 4 * N_matmul * tokens/s / peak FLOP/s (peak: {peak}); 4N = 2N forward + 2N input gradients "
        "(frozen base: no weight gradients); recomputation not counted",
    ]
    for key, model in r["models"].items():
        label = key if key == "nf4" else dtype
        line = f"{label} model: built and wrapped in {model['load_seconds']:.1f} s, attention {model['attention']}"
        check = model.get("packing_check")
        if check and "error" in check:
            line += f"; packing check FAILED: {check['error'][:200]}"
        elif check and "packed_vs_padded" in check:
            ok, leak = check["packed_vs_padded"], check["leaky_vs_padded"]
            line += (
                f"; packing check ({check['rows']} rows, {check['tokens']} tokens): packed vs padded loss "
                f"{ok['loss_rel']:.1e}, LoRA-B grad {ok['grad_rel']:.1e} (leaky control: {leak['loss_rel']:.1e}, "
                f"{leak['grad_rel']:.1e})"
            )
        lines.append(line)
    lines += [
        "",
        f"{'case':<28}{'tokens/s':>10}{'peak GiB':>10}{'reserved':>10}{'MFU':>8}{'MFU meas':>9}{'vs hf':>7}"
        f"{'mem vs hf':>11}",
    ]
    by_name = {c["case"]: c for c in r["cases"]}
    for case in r["cases"]:
        name = case["case"]
        if "skipped" in case:
            lines.append(f"{name:<28}{'skipped: ' + case['skipped'][:80]:>10}")
            continue
        base = by_name.get(parse_case(name).baseline, {})
        mem = f"{case['peak_bytes'] / 2**30:.2f}" if case.get("peak_bytes") else "n/a"
        reserved = f"{case['reserved_bytes'] / 2**30:.2f}" if case.get("reserved_bytes") else "n/a"
        if case.get("tok_s") is None:
            failure = "OOM" if case.get("error", "").startswith("out of memory") else "FAILED"
            lines.append(f"{name:<28}{failure:>10}{'>' + mem:>10}{reserved:>10}  {case.get('error', '')[:100]}")
            continue
        mem_ratio = f"{case['peak_bytes'] / base['peak_bytes']:.2f}" if base.get("peak_bytes") else "n/a"
        mfu = f"{case['mfu']:.1%}" if case["mfu"] is not None else "n/a"
        mfu_measured = f"{case['mfu_measured']:.1%}" if case.get("mfu_measured") is not None else "n/a"
        speed = f"{case['tok_s'] / base['tok_s']:.2f}" if base.get("tok_s") else "n/a"
        lines.append(
            f"{name:<28}{case['tok_s']:>10.1f}{mem:>10}{reserved:>10}{mfu:>8}{mfu_measured:>9}{speed:>7}{mem_ratio:>11}"
        )
    lines.append("(ratios against hf+peft with the same gradient checkpointing and quantization; GiB = 2^30 bytes)")
    for case in r["cases"]:
        if "compile_s" in case:
            failure = case.get("compile_failure")
            lines.append(
                f"{case['case']}: compiled {case['graphs']} graph(s) in {case['compile_s']:.1f} s during its "
                f"{case['warmup_s']:.1f} s warm-up epoch, {case['graphs_in_timed_epoch']} in the timed epoch"
                + (f"; COMPILATION FAILED, ran eagerly: {failure[:200]}" if failure else "")
            )
    for case in r["cases"]:
        if "profile" in case:
            lines += ["", *report_lines(case["case"], case["profile"])]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or hub id, or 'qwen2.5-7b' (default: the embedded SmolLM2-135M)")
    parser.add_argument("--dummy", action="store_true", help="random weights from the model's config")
    parser.add_argument("--cases", type=lambda s: [c.strip() for c in s.split(",") if c.strip()], default=None)
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
    parser.add_argument(
        "--measure-peak",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure the device's matmul peak first, for the MFU meas column (default: on CUDA only)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; --smoke: 1)")
    parser.add_argument("--no-check", dest="check_packing", action="store_false", help="skip the packing check")
    parser.add_argument(
        "--profile",
        nargs="?",
        const="",
        default=None,
        help="profile 3 micro-batches of every case, or of the comma-separated ones named (training/profiling.py)",
    )
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend of +compile cases (default inductor)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny run for the test suite (CPU: under a minute)")
    parser.add_argument("--json-out", type=Path, help="also write the raw results as JSON here")
    args = parser.parse_args()
    if args.smoke:
        args.seq_len, args.rows, args.batch_size, args.grad_accum, args.warmup_rows = 64, 6, 2, 1, 2
        # One thread: on a busy shared CPU, two OpenMP threads wait on each other at every small op.
        args.threads = args.threads or 1
    args.cases = args.cases or DEFAULT_CASES
    for name in args.cases:
        parse_case(name)  # fail on a typo before building a 7B model
    if args.profile is not None:
        args.profile = [c.strip() for c in args.profile.split(",") if c.strip()]
        unknown = set(args.profile) - set(args.cases)
        if unknown:
            raise SystemExit(f"--profile names cases not in --cases: {sorted(unknown)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args)
    print(report(args, results))
    if args.json_out:
        settings = {k: v for k, v in vars(args).items() if k not in ("device", "json_out")}
        args.json_out.write_text(json.dumps({"args": settings, "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
