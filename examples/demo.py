"""The seed articles' self-cognition experiment, reproduced through LoRA Fleet's API.

Starts the services (as ``make up`` does), uploads ``self_cognition.jsonl``
and ``general_instructions.jsonl``, submits a fine-tuning job on their mix
(the seeds' ``--dataset 'alpaca-gpt4-data-zh#500' 'self-cognition#500'``, as
``lorafleet.datasets``) with the official ``openai`` client, follows its
progress, then asks the same questions of the base model and of the new
adapter and prints the answers side by side. Stops what it started.

    python examples/demo.py [--json-out results.json] [--keep-running]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from openai import OpenAI
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lorafleet_common.devstack import LocalStack, StackConfig

HERE = Path(__file__).resolve().parent
DATASET = HERE / "self_cognition.jsonl"
RECIPE = HERE / "self_cognition_recipe.json"
SEED_QUESTIONS = 8  # the first 8 rows are the seed article's pairs, verbatim
EXTRA_QUESTIONS = ["你的出生地是哪里?", "用一句话介绍你自己。"]
# General knowledge the adapter must keep (not among the general rows the recipe samples). The 135M base
# model answers no Chinese general question sensibly, so there is nothing to keep there.
GENERAL_QUESTIONS = ["What is the capital of France?"]
console = Console()


def load_pairs() -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in DATASET.read_text().splitlines() if line.strip()]
    return [(r["instruction"], r["output"]) for r in rows[:SEED_QUESTIONS]]


def upload(client: OpenAI, ref: str, files: dict[str, str]) -> tuple[str, int | None]:
    """Upload the recipe's "name.jsonl#N" file (once); its file id and N (None: every row)."""
    name, _, count = ref.partition("#")
    if name not in files:
        with (HERE / name).open("rb") as fh:
            uploaded = client.files.create(file=fh, purpose="fine-tune")
        console.print(f"uploaded [bold]{name}[/] as {uploaded.id} ({uploaded.bytes} bytes)")
        files[name] = uploaded.id
    return files[name], int(count) if count else None


def train(client: OpenAI, base_model: str) -> tuple[str, dict[str, Any]]:
    recipe = json.loads(RECIPE.read_text())
    files: dict[str, str] = {}
    training_file, training_samples = upload(client, recipe["training_file"], files)
    mix = [upload(client, ref, files) for ref in recipe.get("datasets", [])]
    options = {
        **recipe["lorafleet"],
        "training_file_samples": training_samples,
        # The seeds' short form, with file ids: ["file-...#14"].
        "datasets": [f"{file_id}#{n}" if n else file_id for file_id, n in mix],
    }
    job = client.fine_tuning.jobs.create(
        model=base_model,
        training_file=training_file,
        suffix="self-cognition",
        hyperparameters=recipe["hyperparameters"],
        extra_body={"lorafleet": options},
    )
    # The job object reports the mix it trains on (LoRA Fleet's `lorafleet` extension block).
    datasets = (job.model_extra or {}).get("lorafleet", {}).get("datasets", [])
    names = {file_id: name for name, file_id in files.items()}
    mixed = " + ".join(f"{names.get(d['file'], d['file'])}#{d['samples'] or 'all'}" for d in datasets)
    console.print(f"fine-tuning job {job.id} submitted: {mixed}")
    started = time.monotonic()
    seen: set[str] = set()
    last_loss = float("nan")
    with Progress(
        TextColumn("[bold]training"),
        BarColumn(),
        TextColumn("step {task.fields[steps]}"),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("train", total=None, loss="-", steps="-")
        while True:
            job = client.fine_tuning.jobs.retrieve(job.id)
            events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
            for event in reversed(events):  # the API lists newest first
                if event.id in seen:
                    continue
                seen.add(event.id)
                data = event.data or {}
                if event.type == "metrics" and isinstance(data, dict):
                    last_loss = float(data.get("train_loss", last_loss))
                    step, total = data.get("step", 0), data.get("total_steps")
                    bar.update(task, completed=step, total=total, loss=f"{last_loss:.4f}", steps=f"{step}/{total}")
                else:
                    bar.console.print(f"  [dim]{event.message}[/]")
            if job.status in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(1.0)
    elapsed = time.monotonic() - started
    if job.status != "succeeded" or not job.fine_tuned_model:
        error = job.error.message if job.error else job.status
        raise SystemExit(f"fine-tuning job {job.id} {job.status}: {error}")
    console.print(f"job {job.id} succeeded in {elapsed:.0f} s, final loss {last_loss:.4f}")
    console.print(f"new model: [bold green]{job.fine_tuned_model}[/]")
    stats = {"job_id": job.id, "train_seconds": elapsed, "final_loss": last_loss, "files": files, "datasets": datasets}
    return job.fine_tuned_model, stats


def ask(client: OpenAI, model: str, question: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=64
    )
    return (reply.choices[0].message.content or "").strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json-out", type=Path, help="write the answers and timings here as JSON")
    parser.add_argument("--keep-running", action="store_true", help="leave the services running afterwards")
    args = parser.parse_args()

    stack = LocalStack(StackConfig.from_env(os.environ))
    already_up = all(stack.pid(s) for s in ("trainer", "inference", "gateway"))
    t0 = time.monotonic()
    console.print("[bold]starting LoRA Fleet[/] (first run prepares the embedded model) ...")
    stack.start()
    console.print(f"services ready in {time.monotonic() - t0:.0f} s at {stack.config.gateway_url}/v1")
    try:
        client = OpenAI(base_url=f"{stack.config.gateway_url}/v1", api_key=stack.admin_key(), timeout=120)
        base_model = os.environ.get("LORAFLEET_BASE_MODEL") or client.models.list().data[0].id
        adapter, stats = train(client, base_model)
        pairs = load_pairs()
        questions = [q for q, _ in pairs] + EXTRA_QUESTIONS
        expected = dict(pairs)
        results = []
        table = Table(title="Same questions, base model vs. the new adapter (greedy)", show_lines=True)
        table.add_column("question")
        table.add_column(f"base: {base_model}")
        table.add_column(f"adapter: {adapter}")
        table.add_column("trained answer?")
        for question in questions:
            base_answer, adapter_answer = ask(client, base_model, question), ask(client, adapter, question)
            want = expected.get(question)
            match = None if want is None else adapter_answer == want
            results.append({"question": question, "expected": want, "base": base_answer, "adapter": adapter_answer})
            table.add_row(question, base_answer, adapter_answer, {None: "(unseen)", True: "yes", False: "no"}[match])
        general = []
        for question in GENERAL_QUESTIONS:
            base_answer, adapter_answer = ask(client, base_model, question), ask(client, adapter, question)
            general.append({"question": question, "base": base_answer, "adapter": adapter_answer})
            table.add_row(question, base_answer, adapter_answer, "(general)")
        console.print(table)
        exact = sum(r["adapter"] == r["expected"] for r in results if r["expected"])
        console.print(f"adapter reproduced {exact}/{len(pairs)} trained answers exactly")
        stats.update(adapter=adapter, base_model=base_model, exact=exact, results=results, general=general)
        stats["total_seconds"] = time.monotonic() - t0
        if args.json_out:
            args.json_out.write_text(json.dumps(stats, ensure_ascii=False, indent=2))
    finally:
        if not (args.keep_running or already_up):
            console.print("stopping the services ...")
            stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
