"""The seeds' fine-tuning job, end to end through the trainer's real worker code, with a wall-time split.

The seed articles run (~12-16 min and 21.2 GB on a 24 GB RTX 4090D)::

    swift sft --model Qwen2.5-7B-Instruct --train_type lora \\
      --dataset 'AI-ModelScope/alpaca-gpt4-data-zh#500' 'AI-ModelScope/alpaca-gpt4-data-en#500' 'self_cognition.json' \\
      --num_train_epochs 1 --per_device_train_batch_size 1 --learning_rate 1e-4 --lora_rank 8 --lora_alpha 32 \\
      --target_modules all-linear --gradient_accumulation_steps 16 --system 'You are a helpful assistant.'

Here the same job is a manifest with those settings (the rest are our defaults: max_length 2048, LoRA dropout
0.05, warm-up 5%, checkpoints every 50 steps) handed to ``lorafleet_trainer.worker.run_job``, the function a
job's worker process runs: it reads and checks the datasets from a LocalStore (``file#500`` short forms),
tokenizes them with the base model's tokenizer, loads the model, trains, checkpoints, saves and publishes the
adapter. Two things differ from a production job, both stated in the output:

* the datasets are made up (bench/training/alpaca_rows.py: alpaca-gpt4's shape, Chinese and English text, a
  2,000-row file per language sampled #500 as swift does), since the GPU machine has no network; the
  self-cognition rows are examples/self_cognition.jsonl;
* the weights are random, built on the device (bench/training/random_weights.py, the idea of vLLM's
  ``load_format=dummy``): only ``from_pretrained``'s weight loading is replaced, nothing is written to disk.

    python bench/seeds_workload.py --model qwen2.5-7b --tokenizer-from /tmp/qwen25-tokenizer   # GPU
    python bench/seeds_workload.py --smoke                   # CPU, embedded SmolLM2-135M, ~20 short rows
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from serving.model import SHAPES, write_model_dir  # bench/ is on sys.path: this file runs as a script
from training.alpaca_rows import alpaca_rows, jsonl
from training.random_weights import random_weights

from lorafleet_common.store import LocalStore
from lorafleet_trainer import publish, train_loop, worker
from lorafleet_trainer.distributed import Ranks
from lorafleet_trainer.protocol import EventWriter, WorkerSpec, write_spec

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "You are a helpful assistant."


class DeadlineReached(RuntimeError):
    """The job was stopped after an optimizer step because the run's time was up (--deadline-s)."""


class TimedEvents:
    """The worker's event stream (one JSON object per line), each event kept with the time it arrived."""

    def __init__(self, echo: bool) -> None:
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.echo = echo

    def write(self, text: str) -> int:
        now = time.perf_counter()
        for line in text.splitlines():
            if line.strip():
                event = json.loads(line)
                self.events.append((now, event))
                step = (event.get("progress") or {}).get("step", 0)
                if self.echo and (event.get("kind") != "progress" or step % 10 == 0):
                    print(f"  [{event['kind']}] {event.get('message') or event.get('error', '')}", file=sys.stderr)
        return len(text)

    def flush(self) -> None:
        pass

    def of(self, kind: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, e) for t, e in self.events if e.get("kind") == kind]


@contextlib.contextmanager
def timed(target: Any, name: str, phases: dict[str, list[float]], phase: str) -> Iterator[None]:
    """Wrap ``target.name`` so every call's wall time is added to ``phases[phase]`` (a missing name: no timing)."""
    original = getattr(target, name, None)
    if original is None:
        print(f"warning: {target.__name__}.{name} not found: phase {phase!r} not timed", file=sys.stderr)
        yield
        return

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            phases.setdefault(phase, []).append(time.perf_counter() - began)

    setattr(target, name, wrapper)
    try:
        yield
    finally:
        setattr(target, name, original)


def write_datasets(store: LocalStore, rows_per_file: int, scale: float) -> dict[str, int]:
    """The seeds' three files in the store (keys -> rows); alpaca rows made up, self-cognition from examples/."""
    files = {
        "files/alpaca-gpt4-data-zh.jsonl": jsonl(alpaca_rows("zh", rows_per_file, seed=0, scale=scale)),
        "files/alpaca-gpt4-data-en.jsonl": jsonl(alpaca_rows("en", rows_per_file, seed=0, scale=scale)),
        "files/self_cognition.jsonl": (REPO / "examples" / "self_cognition.jsonl").read_bytes(),
    }
    for key, data in files.items():
        store.put(key, data)
    return {key: data.count(b"\n") for key, data in files.items()}


def seeds_manifest(
    model_folder: str, samples: int, cognition: int | None, packing: bool, compile_layers: bool = False
) -> dict[str, Any]:
    cognition_uri = "files/self_cognition.jsonl" + (f"#{cognition}" if cognition else "")
    return {
        "base_model": model_folder,
        "adapter_name": "seeds-self-cognition" + ("-packed" if packing else ""),
        "datasets": [
            f"files/alpaca-gpt4-data-zh.jsonl#{samples}",
            f"files/alpaca-gpt4-data-en.jsonl#{samples}",
            cognition_uri,
        ],
        "system_prompt": SYSTEM,
        "lora": {"rank": 8, "alpha": 32, "target_modules": "all-linear"},
        "training": {
            "epochs": 1,
            "batch_size": 1,
            "learning_rate": 1e-4,
            "gradient_accumulation_steps": 16,
            "packing": packing,
            "compile": compile_layers,
        },
    }


@contextlib.contextmanager
def memory_cap(cap_gb: float | None) -> Iterator[None]:
    if cap_gb is None or not torch.cuda.is_available():
        yield
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 1e9 / total))
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def rows_announced(stream: TimedEvents) -> int | None:
    """The row count of the worker's RUNNING event ("training on N rows for ..."), for a job that did not finish."""
    for _, event in stream.of("state"):
        match = re.search(r"training on (\d+) rows", event.get("message", ""))
        if match:
            return int(match.group(1))
    return None


def run_seeds_job(args: argparse.Namespace, folder: str, store_dir: Path, packing: bool) -> dict[str, Any]:
    """One job through ``worker.run_job``; the phases' wall times, the training numbers, the published adapter."""
    job_id = f"seeds-{'packed' if packing else 'padded'}-{int(time.time())}"
    job_dir = Path(args.work) / "jobs" / job_id
    spec = WorkerSpec.model_validate(
        {
            "job_id": job_id,
            "manifest": seeds_manifest(folder, args.samples, args.cognition_samples, packing, args.compile),
            "store_url": f"file://{store_dir}",
            "s3": {"endpoint": "localhost:9000", "access_key": "", "secret_key": "", "secure": False}
            | {"region": None, "timeout_s": 10.0},
            "model_cache_dir": str(Path(args.work) / "models"),
            "torch_threads": args.threads or 0,
        }
    )
    write_spec(job_dir, spec)
    stream = TimedEvents(echo=True)
    phases: dict[str, list[float]] = {}
    builds: list[dict[str, Any]] = []
    device = train_loop.pick_device()
    summaries: list[Any] = []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    wrap_train = train_loop.train
    deadline = time.perf_counter() + args.deadline_s if args.deadline_s else None

    def train_and_keep(*a: Any, **k: Any) -> Any:
        """train_loop.train, keeping its summary; past the deadline, stopped after the next optimizer step."""
        if deadline is not None:
            on_step = k.pop("on_step") if "on_step" in k else a[4]

            def on_step_with_deadline(report: Any) -> None:
                on_step(report)
                if time.perf_counter() > deadline and report.step < report.total_steps:
                    raise DeadlineReached(f"stopped at the deadline after step {report.step}/{report.total_steps}")

            a = (*a[:4], on_step_with_deadline, *a[5:]) if len(a) > 4 else a
            if len(a) <= 4:
                k["on_step"] = on_step_with_deadline
        summary = wrap_train(*a, **k)
        summaries.append(summary)
        return summary

    with contextlib.ExitStack() as stack:
        stack.enter_context(timed(worker, "read_rows", phases, "read+validate"))
        stack.enter_context(timed(worker, "tokenize_rows", phases, "tokenize"))
        stack.enter_context(timed(train_loop, "load_lora_model", phases, "model build"))
        stack.enter_context(timed(publish, "save_adapter", phases, "save"))
        stack.enter_context(timed(publish, "publish_with_retry", phases, "publish"))
        stack.enter_context(random_weights(device, log=builds) if args.random_weights else contextlib.nullcontext())
        stack.enter_context(memory_cap(args.memory_cap_gb))
        train_loop.train = train_and_keep  # type: ignore[assignment]
        stack.callback(setattr, train_loop, "train", wrap_train)
        stack.enter_context(timed(train_loop, "train", phases, "training"))
        began = time.perf_counter()
        error = ""
        try:
            worker.run_job(job_dir, EventWriter(stream), Ranks())
        except Exception as exc:  # a JobFailed or a crash: reported with what was measured up to it
            error = f"{type(exc).__name__}: {exc}"
        total = time.perf_counter() - began
    peak = train_loop.peak_memory_bytes(device)  # CUDA: max allocated; CPU: the process's peak RSS
    reserved = torch.cuda.max_memory_reserved() if device.type == "cuda" else None
    seconds = {phase: round(sum(times), 3) for phase, times in phases.items()}
    seconds["total"] = round(total, 3)
    seconds["other"] = round(total - sum(v for k, v in seconds.items() if k != "total"), 3)
    progress = [e for _, e in stream.of("progress")]
    published = stream.of("published")
    store = LocalStore(store_dir)
    metadata: dict[str, Any] = {}
    if published:
        uri = published[-1][1]["adapter_uri"]
        prefix = "adapters/" + uri.split("adapters/", 1)[-1].rstrip("/")
        with contextlib.suppress(Exception):
            metadata = json.loads(store.get(f"{prefix}/metadata.json"))
    summary = summaries[-1] if summaries else None
    trained = summary.trained_tokens if summary else int(progress[-1].get("trained_tokens", 0)) if progress else 0
    total_steps = next((int(e["total_steps"]) for _, e in stream.of("state") if e.get("total_steps")), None)
    train_s = seconds.get("training", 0.0)
    return {
        "job_id": job_id,
        "packing": packing,
        "compile": args.compile,
        "error": error or next((e.get("error", "") for _, e in stream.of("failed")), ""),
        "seconds": seconds,
        "random_weights_seconds": round(sum(b["seconds"] for b in builds), 3) if builds else None,
        "steps": summary.steps if summary else len(progress),
        "total_steps": total_steps,
        "stopped_at_deadline": error.startswith("DeadlineReached"),
        "trained_tokens": trained,
        "tokens_per_s": trained / train_s if train_s else None,
        "peak_bytes": peak,
        "reserved_bytes": reserved,
        "memory_cap_gb": args.memory_cap_gb,
        "loss_first": progress[0]["progress"]["loss"] if progress else None,
        "loss_last": progress[-1]["progress"]["loss"] if progress else None,
        "training_rows": metadata.get("training_rows") or rows_announced(stream),
        "rows_dropped": metadata.get("rows_dropped"),
        "adapter_uri": published[-1][1]["adapter_uri"] if published else None,
        "adapter_files": sorted(p.rsplit("/", 1)[-1] for p in store.list("adapters/")) if published else [],
        "messages": [e.get("message", "") for _, e in stream.events if e.get("kind") in ("log", "state")],
    }


def model_folder(args: argparse.Namespace) -> tuple[str, str]:
    if args.model in SHAPES:  # qwen2.5-7b, or tiny-qwen2 (the same architecture and tokenizer, a CPU's size)
        if not args.tokenizer_from:
            raise SystemExit(
                f"--model {args.model} needs --tokenizer-from DIR (tokenizer.json + tokenizer_config.json)"
            )
        folder = write_model_dir(Path(args.work) / args.model, args.model, tokenizer_from=Path(args.tokenizer_from))
        return str(folder), f"{args.model} shape, Qwen2.5 tokenizer"
    if args.model:
        return args.model, args.model
    from lorafleet_common.embedded_model import prepare_embedded_model

    home = Path(os.environ.get("LORAFLEET_HOME") or Path.cwd() / ".lorafleet")
    return str(prepare_embedded_model(home / "models")), "SmolLM2-135M-Instruct (embedded)"


def report(args: argparse.Namespace, label: str, files: dict[str, int], jobs: list[dict[str, Any]]) -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    weights = "random weights built on the device (only from_pretrained's loading replaced)"
    lines = [
        f"seeds workload through lorafleet_trainer.worker.run_job: {label}, "
        f"{weights if args.random_weights else 'real weights'}, {device}",
        f"data: {', '.join(f'{k} ({v} rows)' for k, v in files.items())}; "
        "alpaca rows made up (bench/training/alpaca_rows.py"
        + (f", lengths x{args.scale:g})" if args.scale != 1 else ")"),
        f"manifest: #{args.samples} + #{args.samples} + self-cognition"
        + (f"#{args.cognition_samples}" if args.cognition_samples else " (all)")
        + ", 1 epoch, batch 1, accumulation 16, lr 1e-4, LoRA r8 alpha 32 all-linear, max_length 2048"
        + (f"; CUDA allocator capped at {args.memory_cap_gb:g} GB" if args.memory_cap_gb else ""),
        "",
    ]
    order = ["read+validate", "tokenize", "model build", "training", "save", "publish", "other", "total"]
    labels = ["packing " + ("on" if j["packing"] else "off") + (" +c" if j.get("compile") else "") for j in jobs]
    header = f"{'phase (seconds)':<20}" + "".join(f"{label:>14}" for label in labels)
    lines.append(header)
    for phase in order:
        cells = "".join(f"{j['seconds'].get(phase, float('nan')):>14.2f}" for j in jobs)
        lines.append(f"{phase:<20}{cells}")

    def row(name: str, cell: Callable[[dict[str, Any]], str]) -> None:
        lines.append(f"{name:<20}" + "".join(f"{cell(j):>14}" for j in jobs))

    row("  of which weights", lambda j: f"{j['random_weights_seconds']:.2f}" if j["random_weights_seconds"] else "-")
    row("training rows", lambda j: str(j["training_rows"]))
    row("optimizer steps", lambda j: f"{j['steps']}/{j['total_steps']}")
    row("trained tokens", lambda j: str(j["trained_tokens"]))
    row("tokens/s (training)", lambda j: f"{j['tokens_per_s']:.0f}" if j["tokens_per_s"] else "n/a")
    row(
        "peak GiB" if torch.cuda.is_available() else "peak RSS GiB",
        lambda j: f"{j['peak_bytes'] / 2**30:.2f}" if j["peak_bytes"] else "n/a",
    )
    row("peak GiB (reserved)", lambda j: f"{j['reserved_bytes'] / 2**30:.2f}" if j["reserved_bytes"] else "n/a")
    row("loss first / last", lambda j: f"{j['loss_first'] or 0:.2f}/{j['loss_last'] or 0:.2f}")
    for job in jobs:
        if job["stopped_at_deadline"]:
            lines.append(
                f"packing {'on' if job['packing'] else 'off'}: NOT FINISHED, {job['error'][:200]} "
                f"({job['seconds'].get('training', 0):.0f} s of training): the numbers above cover those steps only"
            )
        elif job["error"]:
            lines.append(f"packing {'on' if job['packing'] else 'off'}: FAILED: {job['error'][:300]}")
        else:
            lines.append(f"packing {'on' if job['packing'] else 'off'}: published {job['adapter_uri']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", help="'qwen2.5-7b' (its public config), 'tiny-qwen2', a model folder (default: the embedded model)"
    )
    parser.add_argument("--tokenizer-from", help="folder with tokenizer.json + tokenizer_config.json (qwen2.5-7b)")
    parser.add_argument("--packing", dest="packing_given", choices=["off", "on", "both"], default=None)
    parser.add_argument("--compile", action="store_true", help="training.compile on (compiled decoder layers)")
    parser.add_argument("--samples", type=int, default=500, help="rows sampled per alpaca file (default 500)")
    parser.add_argument("--cognition-samples", type=int, default=None, help="self-cognition rows (default: all)")
    parser.add_argument("--rows-per-file", type=int, default=2000, help="rows made up per alpaca file")
    parser.add_argument("--scale", type=float, default=1.0, help="length scale of the made-up rows")
    parser.add_argument("--real-weights", dest="random_weights", action="store_false", help="load the folder's weights")
    parser.add_argument("--memory-cap-gb", type=float, default=None, help="cap CUDA memory (GB, 10^9 bytes)")
    parser.add_argument(
        "--deadline-s", type=float, default=None, help="stop a job after the optimizer step that passes this many s"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (--smoke: 1)")
    parser.add_argument("--work", default=None, help="working folder (store, job folders; default: a temporary one)")
    parser.add_argument("--smoke", action="store_true", help="CPU: embedded model, 12 short rows, one job")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    args.packing = args.packing_given or "both"
    if args.smoke:
        args.samples, args.cognition_samples, args.rows_per_file, args.scale = 5, 2, 40, 0.03
        args.threads = args.threads or 1
        args.packing = args.packing_given or "on"  # one job: the worker path is the same for both
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work = args.work or tempfile.mkdtemp(prefix="seeds-workload-")
    began = time.perf_counter()
    folder, label = model_folder(args)
    store_dir = Path(args.work) / "store"
    files = write_datasets(LocalStore(store_dir), args.rows_per_file, args.scale)
    prepared = time.perf_counter() - began
    jobs = []
    for packing in {"off": [False], "on": [True], "both": [False, True]}[args.packing]:
        print(f"job: packing {'on' if packing else 'off'}", file=sys.stderr, flush=True)
        jobs.append(run_seeds_job(args, folder, store_dir, packing))
    print(report(args, label, files, jobs))
    print(f"(data and model folder prepared in {prepared:.1f} s before the jobs; not part of a job)")
    if args.json_out:
        settings = {k: v for k, v in vars(args).items() if k != "json_out"}
        args.json_out.write_text(json.dumps({"args": settings, "files": files, "jobs": jobs}, indent=2, default=str))
    return 0 if all(not job["error"] for job in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
