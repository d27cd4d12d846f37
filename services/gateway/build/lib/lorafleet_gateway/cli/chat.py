"""`lorafleet chat`: talk to the base model or an adapter, streaming; one question (-m) or interactive."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import click

from lorafleet_gateway.cli.client import CliError, FleetClient, stream_error
from lorafleet_gateway.cli.context import CliContext, json_option, pass_cli, print_json

HELP = "commands: /model NAME (switch, new conversation), /system TEXT, /reset, /exit (or Ctrl-D)"


@dataclass
class Conversation:
    model: str
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def body(self, question: str, *, stream: bool) -> dict[str, Any]:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [*messages, {"role": "user", "content": question}],
            "stream": stream,
        }
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body

    def remember(self, question: str, answer: str) -> None:
        self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def stream_answer(client: FleetClient, conversation: Conversation, question: str) -> str:
    """Print the answer as it streams; return it whole."""
    answer = []
    with client.stream("POST", "/v1/chat/completions", body=conversation.body(question, stream=True)) as sse:
        for message in sse:
            if message.data == "[DONE]":
                break
            chunk = message.json()
            if "error" in chunk:
                raise stream_error(chunk)
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    answer.append(text)
                    sys.stdout.write(text)
                    sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(answer)


def pick_model(client: FleetClient) -> str:
    models = [card["id"] for card in client.get("/v1/models")["data"]]
    if not sys.stdin.isatty():
        raise CliError("name a model: lorafleet chat MODEL (models: " + ", ".join(models) + ")")
    for number, model in enumerate(models, start=1):
        click.echo(f"  {number}. {model}")
    choice = click.prompt("model", type=click.IntRange(1, len(models)), default=1)
    return models[choice - 1]


def interactive(client: FleetClient, conversation: Conversation) -> None:
    click.echo(f"chatting with {conversation.model}; {HELP}")
    while True:
        try:
            line = click.prompt("you", prompt_suffix="> ", default="", show_default=False).strip()
        except (EOFError, click.exceptions.Abort):
            click.echo()
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            conversation.history.clear()
            click.echo("(new conversation)")
            continue
        if line.startswith("/model "):
            conversation.model, conversation.history = line.removeprefix("/model ").strip(), []
            click.echo(f"(now chatting with {conversation.model})")
            continue
        if line.startswith("/system"):
            conversation.system = line.removeprefix("/system").strip() or None
            click.echo(f"(system prompt {'set' if conversation.system else 'cleared'})")
            continue
        if line.startswith("/"):
            click.echo(HELP)
            continue
        click.echo(f"{conversation.model}> ", nl=False)
        try:
            conversation.remember(line, stream_answer(client, conversation, line))
        except KeyboardInterrupt:
            click.echo("\n(stopped)")
        except CliError as exc:  # keep the session: a typo in /model should not end it
            click.echo(f"\nerror: {exc.message}", err=True)


@click.command()
@click.argument("model", required=False)
@click.option("-m", "--message", help='Ask this one question and exit ("-" reads it from stdin).')
@click.option("-s", "--system", help="System prompt (default: the adapter's own, if it has one).")
@click.option("--temperature", type=click.FloatRange(0, 2), help="Sampling temperature (0 = greedy).")
@click.option("--max-tokens", type=click.IntRange(1), help="Longest answer, in tokens.")
@json_option
@pass_cli
def chat(
    cli: CliContext,
    model: str | None,
    message: str | None,
    system: str | None,
    temperature: float | None,
    max_tokens: int | None,
) -> None:
    """Chat with MODEL (the base model or an adapter id), streaming the answers.

    With -m, ask one question and print the answer (with --json: the whole chat.completion object);
    without it, an interactive session (MODEL is asked for if not given).
    """
    client = cli.client()
    conversation = Conversation(model or "", system, temperature, max_tokens)
    if message is None:
        conversation.model = model or pick_model(client)
        interactive(client, conversation)
        return
    if not model:
        raise CliError("name a model: lorafleet chat MODEL -m QUESTION")
    question = sys.stdin.read() if message == "-" else message
    if cli.json:
        print_json(client.post("/v1/chat/completions", conversation.body(question, stream=False)))
        return
    stream_answer(client, conversation, question)
