"""Following a fine-tuning job live: its event stream (resumed with Last-Event-ID if it drops) shown as a
progress bar with the loss and a sparkline of the loss curve, until the job is final."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lorafleet_gateway.cli.client import EXIT_UNAVAILABLE, CliError, FleetClient, path_of, stream_error
from lorafleet_gateway.cli.context import console, loss, sparkline, when

FINAL = ("succeeded", "failed", "cancelled")
_RETRIES = 5


def watch_events(client: FleetClient, job_id: str, on_event: Callable[[dict[str, Any]], None]) -> None:
    """Call ``on_event`` for every event of the job, recorded then live, until the job is final.

    A dropped stream is resumed from the last event seen (up to _RETRIES times in a row).
    """
    last_id: str | None = None
    failures = 0
    while True:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        try:
            with client.stream("GET", path_of("/v1/fine_tuning/jobs", job_id, "events/stream"), headers=headers) as sse:
                for message in sse:
                    if message.data == "[DONE]":
                        return
                    event = message.json()
                    if "error" in event:
                        raise stream_error(event)
                    last_id = message.id or last_id
                    failures = 0
                    on_event(event)
        except CliError as exc:
            if exc.exit_code != EXIT_UNAVAILABLE or failures >= _RETRIES:
                raise
            failures += 1
            time.sleep(min(8.0, 0.5 * 2**failures))
            continue
        failures += 1  # ended without [DONE]: the stream's time ran out; resume
        if failures > _RETRIES:
            raise CliError(f"the event stream of {job_id} keeps ending early; try `lorafleet jobs follow {job_id}`")


def follow_job(client: FleetClient, job_id: str, *, quiet: bool = False) -> dict[str, Any]:
    """Show the job's progress until it is final; returns the final job object."""
    losses: list[float] = []
    if quiet:
        watch_events(client, job_id, lambda event: None)
        job: dict[str, Any] = client.get(path_of("/v1/fine_tuning/jobs", job_id))
        return job
    columns = (
        TextColumn("[bold]training"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("[cyan]{task.fields[curve]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console()) as bar:
        task = bar.add_task("train", total=None, loss="-", curve="")

        def show(event: dict[str, Any]) -> None:
            data = event.get("data") or {}
            if event.get("type") == "metrics":
                losses.append(float(data.get("train_loss", 0.0)))
                bar.update(
                    task,
                    completed=data.get("step", 0),
                    total=data.get("total_steps") or None,
                    loss=loss(losses[-1]),
                    curve=sparkline(losses, 24),
                )
            else:
                style = "red" if event.get("level") == "error" else "dim"
                bar.console.print(f"[{style}]{when(event.get('created_at'))}  {event.get('message', '')}[/]")

        watch_events(client, job_id, show)
    job = client.get(path_of("/v1/fine_tuning/jobs", job_id))
    if losses:
        console().print(f"loss {loss(losses[0])} -> {loss(losses[-1])} over {len(losses)} steps  {sparkline(losses)}")
    return job


def require_success(job: dict[str, Any]) -> None:
    if job.get("status") != "succeeded":
        reason = (job.get("error") or {}).get("message") or job.get("status")
        raise CliError(f"job {job.get('id')} {job.get('status')}: {reason}")
