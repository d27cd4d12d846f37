"""`lorafleet jobs`: list, show, follow, events, cancel."""

from __future__ import annotations

import json
from typing import Any

import click

from lorafleet_gateway.cli.client import path_of
from lorafleet_gateway.cli.context import (
    CliContext,
    console,
    fields,
    json_option,
    loss,
    pass_cli,
    print_json,
    sparkline,
    table,
    when,
)
from lorafleet_gateway.cli.follow import follow_job, require_success, watch_events

JOBS = "/v1/fine_tuning/jobs"


def progress(job: dict[str, Any]) -> str:
    extra = job.get("lorafleet") or {}
    return f"{extra.get('step', 0)}/{extra['total_steps']}" if extra.get("total_steps") else "-"


@click.group()
def jobs() -> None:
    """Fine-tuning jobs: list, inspect, follow live, cancel."""


@jobs.command("list")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True, help="How many, newest first.")
@json_option
@pass_cli
def list_jobs(cli: CliContext, limit: int) -> None:
    """List your fine-tuning jobs, newest first."""
    page = cli.client().get(JOBS, limit=limit)
    if cli.json:
        print_json(page)
        return
    rows = [
        (
            j["id"],
            j["status"],
            progress(j),
            loss((j.get("lorafleet") or {}).get("loss")),
            j.get("fine_tuned_model") or j.get("model"),
            when(j.get("created_at")),
        )
        for j in page["data"]
    ]
    table(None, ("JOB", "STATUS", "STEPS", "LOSS", "MODEL", "CREATED"), rows)


@jobs.command("show")
@click.argument("job_id")
@json_option
@pass_cli
def show_job(cli: CliContext, job_id: str) -> None:
    """Show one job: status, model, hyperparameters, progress and its loss curve so far."""
    client = cli.client()
    job = client.get(path_of(JOBS, job_id))
    if cli.json:
        print_json(job)
        return
    events = client.get(path_of(JOBS, job_id, "events"), limit=1000)["data"]
    losses = [e["data"]["train_loss"] for e in reversed(events) if e.get("type") == "metrics"]
    hp = job.get("hyperparameters") or {}
    extra = job.get("lorafleet") or {}
    fields(
        [
            ("id", job["id"]),
            ("status", job["status"]),
            ("base model", job.get("model")),
            ("fine-tuned model", job.get("fine_tuned_model")),
            ("training file", job.get("training_file")),
            ("created", when(job.get("created_at"))),
            ("finished", when(job.get("finished_at"))),
            ("steps", progress(job)),
            ("loss", loss(extra.get("loss"))),
            ("loss curve", sparkline(losses, 60)),
            ("trained tokens", job.get("trained_tokens")),
            ("hyperparameters", ", ".join(f"{k}={v}" for k, v in hp.items())),
            ("error", (job.get("error") or {}).get("message")),
        ]
    )


@jobs.command("follow")
@click.argument("job_id")
@json_option
@pass_cli
def follow(cli: CliContext, job_id: str) -> None:
    """Follow a job live (progress bar with the loss) until it ends; exit 1 unless it succeeded."""
    job = follow_job(cli.client(), job_id, quiet=cli.json)
    if cli.json:
        print_json(job)
    else:
        console().print(
            f"job {job['id']} {job['status']}" + (f": {job['fine_tuned_model']}" if job.get("fine_tuned_model") else "")
        )
    require_success(job)


@jobs.command("events")
@click.argument("job_id")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True, help="How many of the latest.")
@click.option("-f", "--follow", "live", is_flag=True, help="Keep printing new events until the job ends.")
@json_option
@pass_cli
def events(cli: CliContext, job_id: str, limit: int, live: bool) -> None:
    """Print a job's events, oldest first (with --json: the API's list; with --follow --json: one JSON per line)."""
    client = cli.client()

    def line(event: dict[str, Any]) -> None:
        if cli.json:
            click.echo(json.dumps(event, ensure_ascii=False))
        else:
            click.echo(f"{when(event.get('created_at'))}  {event.get('level', 'info'):5}  {event.get('message', '')}")

    if live:
        watch_events(client, job_id, line)
        return
    page = client.get(path_of(JOBS, job_id, "events"), limit=limit)
    if cli.json:
        print_json(page)
        return
    for event in reversed(page["data"]):
        line(event)


@jobs.command("cancel")
@click.argument("job_id")
@json_option
@pass_cli
def cancel(cli: CliContext, job_id: str) -> None:
    """Cancel a queued or running job (a finished job is left as it is)."""
    job = cli.client().post(path_of(JOBS, job_id, "cancel"))
    if cli.json:
        print_json(job)
    else:
        click.echo(f"{job['id']}: {job['status']}")
