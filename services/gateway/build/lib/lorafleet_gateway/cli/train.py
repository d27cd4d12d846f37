"""`lorafleet train`: upload a dataset, submit a fine-tuning job, follow it live."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from lorafleet_gateway.cli.client import CliError, FleetClient
from lorafleet_gateway.cli.context import CliContext, console, json_option, pass_cli, print_json
from lorafleet_gateway.cli.follow import follow_job, require_success


def base_model(client: FleetClient) -> str:
    """The fleet's base model: the one model in /v1/models without a parent."""
    for card in client.get("/v1/models")["data"]:
        if not card.get("parent"):
            return str(card["id"])
    raise CliError("the gateway lists no base model; pass --model")


def job_body(*, model: str, training_file: str, recipe: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The POST /v1/fine_tuning/jobs body: the recipe file first, then the options given on the command line."""
    hyperparameters = dict(recipe.get("hyperparameters") or {})
    extension = {k: dict(v) if isinstance(v, dict) else v for k, v in (recipe.get("lorafleet") or {}).items()}
    for option, key in (
        ("epochs", "n_epochs"),
        ("batch_size", "batch_size"),
        ("lr_multiplier", "learning_rate_multiplier"),
    ):
        if options.get(option) is not None:
            hyperparameters[key] = options[option]
    lora = dict(extension.get("lora") or {})
    for option in ("rank", "alpha", "dropout"):
        if options.get(option) is not None:
            lora[option] = options[option]
    if options.get("target_modules"):
        modules = options["target_modules"]
        lora["target_modules"] = modules if modules == "all-linear" else [m.strip() for m in modules.split(",")]
    if lora:
        extension["lora"] = lora
    if options.get("system_prompt") is not None:
        extension["system_prompt"] = options["system_prompt"]
    body: dict[str, Any] = {"model": model, "training_file": training_file}
    suffix = options.get("suffix") or recipe.get("suffix")
    if suffix:
        body["suffix"] = suffix
    if options.get("seed") is not None:
        body["seed"] = options["seed"]
    if hyperparameters:
        body["hyperparameters"] = hyperparameters
    if extension:
        body["lorafleet"] = extension
    return body


def read_recipe(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        recipe = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read the recipe {path}: {exc}") from None
    if not isinstance(recipe, dict):
        raise CliError(f"the recipe {path} must be a JSON object")
    return recipe


@click.command()
@click.argument("dataset", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", help="Base model to fine-tune (default: the fleet's base model).")
@click.option("--suffix", help="Goes into the new model's name: ft:<base>:<tenant>:<suffix>:<job>.")
@click.option("--epochs", type=click.IntRange(1, 1000), help="Training epochs (OpenAI n_epochs).")
@click.option("--batch-size", type=click.IntRange(1, 4096), help="Examples per optimizer step.")
@click.option("--lr-multiplier", type=click.FloatRange(min=0, min_open=True), help="Learning rate x 1e-4.")
@click.option("--rank", type=click.IntRange(1, 512), help="LoRA rank r.")
@click.option("--alpha", type=float, help="LoRA alpha.")
@click.option("--dropout", type=click.FloatRange(0, 1), help="LoRA dropout.")
@click.option("--target-modules", help='"all-linear" or a comma-separated list (q_proj,v_proj,...).')
@click.option("--system-prompt", help="System prompt for rows without one; recorded with the adapter.")
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), help="Random seed.")
@click.option(
    "--recipe",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='JSON file with "hyperparameters", "lorafleet" (lora, training, system_prompt) and "suffix"; '
    "options given here win.",
)
@click.option("--detach", is_flag=True, help="Submit and return at once instead of following the job.")
@json_option
@pass_cli
def train(cli: CliContext, dataset: Path, model: str | None, recipe: Path | None, detach: bool, **options: Any) -> None:
    """Fine-tune a LoRA adapter on DATASET (JSONL: messages, Alpaca or ShareGPT rows) and follow it live.

    Exits 0 when the job succeeded (printing the new model's id), 1 if it failed or was cancelled.
    """
    client = cli.client()
    say = (lambda text: None) if cli.json else console().print
    body_recipe = read_recipe(recipe)
    model = model or body_recipe.get("model") or base_model(client)
    with dataset.open("rb") as fh:
        upload = client.request("POST", "/v1/files", files={"file": (dataset.name, fh)}, data={"purpose": "fine-tune"})
    say(f"uploaded {escape(dataset.name)} as {upload['id']} ({upload['bytes']} bytes)")
    job = client.post(
        "/v1/fine_tuning/jobs", job_body(model=model, training_file=upload["id"], recipe=body_recipe, options=options)
    )
    say(f"fine-tuning job [bold]{job['id']}[/] submitted; console: {client.url}/console/jobs/{job['id']}")
    if detach:
        if cli.json:
            print_json(job)
        else:
            say(f"follow it with: lorafleet jobs follow {job['id']}")
        return
    final = follow_job(client, job["id"], quiet=cli.json)
    if cli.json:
        print_json(final)
    require_success(final)
    name = escape(final["fine_tuned_model"])
    say(f"[green]succeeded[/]: new model [bold]{name}[/]")
    say(f"try it: lorafleet chat '{name}' -m 'Who are you?'")
