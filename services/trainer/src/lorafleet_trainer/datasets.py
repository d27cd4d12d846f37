"""Training data: read every dataset file, check every row, turn rows into conversations.

Formats (per file, or detected per row with ``auto``):

- alpaca:   {instruction, input?, output, system?, history?: [[q, a], ...]}
- sharegpt: {conversations: [{from: human|gpt|system, value}], system?}
- messages: {messages: [{role: system|user|assistant, content, weight?: 0|1}]}  (OpenAI fine-tuning JSONL)

Files are JSONL or one JSON array. All problems in all files are collected
before anything trains, each as ``file <uri>, row <n>, field <f>: <why>``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any

from lorafleet_common.store import ObjectNotFound, ObjectStore, S3Config, StoreError, resolve_uri
from lorafleet_trainer.manifest import DatasetSpec

MAX_PROBLEMS_IN_MESSAGE = 10
MAX_SHOWN_VALUE_CHARS = 60  # a bad value quoted in a problem is cut to this: a 10 MB "role" stays out of messages
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class Message:
    """One turn. ``train`` is False for an assistant turn the loss must skip (OpenAI ``weight: 0``)."""

    role: str
    content: str
    train: bool = True


@dataclass(frozen=True)
class Example:
    """One training conversation and where it came from."""

    messages: tuple[Message, ...]
    source: str
    row: int


@dataclass
class DatasetReport:
    """What one dataset file contributed (goes into the adapter metadata)."""

    uri: str
    format: str
    sha256: str
    rows: int
    used: int

    def as_metadata(self) -> dict[str, Any]:
        return {"uri": self.uri, "format": self.format, "sha256": self.sha256, "rows": self.rows, "used": self.used}


class DatasetError(ValueError):
    """The training data cannot be used; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = "; ".join(problems[:MAX_PROBLEMS_IN_MESSAGE])
        # Lone surrogates (from "\ud800" escapes in a uri or key) would break the gRPC status: spell them out.
        shown = shown.encode("utf-8", "backslashreplace").decode("utf-8")
        more = len(problems) - MAX_PROBLEMS_IN_MESSAGE
        suffix = f"; and {more} more" if more > 0 else ""
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"dataset validation failed ({count}): {shown}{suffix}")


class _RowProblems:
    """Collects the problems of one row."""

    def __init__(self) -> None:
        self.items: list[tuple[str | None, str]] = []

    def add(self, field: str | None, why: str) -> None:
        self.items.append((field, why))


# json.loads recurses once per nesting level: past the interpreter's limit it raises RecursionError.
_TOO_DEEP = "nested too deeply"


def _lines(text: str) -> list[str]:
    # Only CR/LF end a JSONL row. str.splitlines() also splits on U+2028, U+0085 and friends, which JSON
    # allows raw inside strings: a valid row holding one would be cut in two invalid halves.
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def split_rows(data: bytes) -> list[tuple[int, Any]] | str:
    """(row number, parsed value) per row of a JSONL file or JSON array; a string says why it cannot be read."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text ({exc})"
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as exc:
            return f"invalid JSON array ({exc})"
        except RecursionError:
            return f"invalid JSON array ({_TOO_DEEP})"
        return list(enumerate(rows, start=1))
    parsed: list[tuple[int, Any]] = []
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            parsed.append((number, json.loads(line)))
        except ValueError as exc:
            parsed.append((number, _BadJson(str(exc))))
        except RecursionError:
            parsed.append((number, _BadJson(_TOO_DEEP)))
    return parsed


def _shown(value: Any) -> str:
    if isinstance(value, list | dict):  # its repr could be huge, or recurse as deep as json.loads did
        return f"of type {type(value).__name__}"
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_VALUE_CHARS else f"{text[:MAX_SHOWN_VALUE_CHARS]}... ({len(text)} chars)"


@dataclass(frozen=True)
class _BadJson:
    why: str


def _string(value: Any, field: str, problems: _RowProblems, *, required: bool, allow_empty: bool = False) -> str:
    if value is None:
        if required:
            problems.add(field, "is required")
        return ""
    if not isinstance(value, str):
        problems.add(field, f"must be a string, got {type(value).__name__}")
        return ""
    if not allow_empty and not value.strip():
        problems.add(field, "must not be empty")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON's "\ud800" escapes decode to text no tokenizer can encode
            problems.add(field, f"holds an unpaired UTF-16 surrogate {value[exc.start]!r} at character {exc.start}")
    return value


def _check_turn_order(messages: list[Message], fields: list[str], problems: _RowProblems) -> None:
    """system? then user/assistant alternating, starting with user and ending with assistant."""
    body = messages[1:] if messages and messages[0].role == "system" else messages
    body_fields = fields[1:] if messages and messages[0].role == "system" else fields
    for i, (message, field) in enumerate(zip(body, body_fields, strict=True)):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            where = "only as the first turn" if message.role == "system" else "in user/assistant alternation"
            problems.add(field, f"expected role {expected!r}, got {message.role!r} (system is allowed {where})")
            return
    if not body:
        problems.add(fields[0] if fields else None, "conversation has no user/assistant turns")
    elif body[-1].role != "assistant":
        problems.add(body_fields[-1], "conversation must end with an assistant turn")


def _from_turns(
    row: dict[str, Any], key: str, role_key: str, text_key: str, roles: dict[str, str], problems: _RowProblems
) -> tuple[Message, ...]:
    turns = row.get(key)
    if turns is None:
        problems.add(key, "is required")
        return ()
    if not isinstance(turns, list):
        problems.add(key, f"must be a list, got {type(turns).__name__}")
        return ()
    if not turns:
        problems.add(key, "empty conversation")
        return ()
    messages: list[Message] = []
    fields: list[str] = []
    system = row.get("system")
    if system is not None and key == "conversations":
        messages.append(Message("system", _string(system, "system", problems, required=False, allow_empty=True)))
        fields.append("system")
    for i, turn in enumerate(turns):
        field = f"{key}[{i}]"
        if not isinstance(turn, dict):
            problems.add(field, f"must be an object, got {type(turn).__name__}")
            continue
        raw_role = turn.get(role_key)
        role = roles.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            problems.add(f"{field}.{role_key}", f"unknown role {_shown(raw_role)}; expected one of {sorted(roles)}")
            continue
        content = _string(
            turn.get(text_key), f"{field}.{text_key}", problems, required=True, allow_empty=role == "system"
        )
        train = True
        if "weight" in turn:
            weight = turn["weight"]
            if role != "assistant" or weight not in (0, 1) or isinstance(weight, bool):
                problems.add(f"{field}.weight", "must be 0 or 1, and only on assistant turns")
            train = weight == 1
        messages.append(Message(role, content, train))
        fields.append(f"{field}.{role_key}")
    if len(messages) == len(fields) and not problems.items:
        _check_turn_order(messages, fields, problems)
    return tuple(messages)


def _from_alpaca(row: dict[str, Any], problems: _RowProblems) -> tuple[Message, ...]:
    instruction = _string(row.get("instruction"), "instruction", problems, required=True)
    extra = _string(row.get("input"), "input", problems, required=False, allow_empty=True)
    output = _string(row.get("output"), "output", problems, required=True)
    messages: list[Message] = []
    if row.get("system") is not None:
        messages.append(Message("system", _string(row["system"], "system", problems, required=False, allow_empty=True)))
    history = row.get("history")
    if history is not None:
        if not isinstance(history, list):
            problems.add("history", f"must be a list of [question, answer] pairs, got {type(history).__name__}")
        for i, pair in enumerate(history if isinstance(history, list) else []):
            if not (isinstance(pair, list | tuple) and len(pair) == 2):
                problems.add(f"history[{i}]", "must be a [question, answer] pair")
                continue
            question = _string(pair[0], f"history[{i}][0]", problems, required=True)
            answer = _string(pair[1], f"history[{i}][1]", problems, required=True)
            messages += [Message("user", question), Message("assistant", answer)]
    user = f"{instruction}\n{extra}" if extra else instruction
    messages += [Message("user", user), Message("assistant", output)]
    return tuple(messages)


def detect_format(row: dict[str, Any]) -> str | None:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row or "output" in row:
        return "alpaca"
    return None


def row_to_messages(row: Any, fmt: str, problems: _RowProblems) -> tuple[Message, ...]:
    """Convert one parsed row; problems are added to ``problems``."""
    if isinstance(row, _BadJson):
        problems.add(None, f"invalid JSON ({row.why})")
        return ()
    if not isinstance(row, dict):
        problems.add(None, f"must be a JSON object, got {type(row).__name__}")
        return ()
    detected = detect_format(row) if fmt == "auto" else fmt
    if detected == "alpaca":
        return _from_alpaca(row, problems)
    if detected == "sharegpt":
        return _from_turns(row, "conversations", "from", "value", _SHAREGPT_ROLES, problems)
    if detected == "messages":
        return _from_turns(row, "messages", "role", "content", _MESSAGE_ROLES, problems)
    problems.add(None, "cannot detect the format: expected a 'messages', 'conversations' or 'instruction' field")
    return ()


def read_dataset(spec: DatasetSpec, data: bytes) -> tuple[list[Example], list[str]]:
    """Every row of one file as an Example, and every problem found."""
    rows = split_rows(data)
    if isinstance(rows, str):
        return [], [f"file {spec.uri}: {rows}"]
    examples: list[Example] = []
    problems: list[str] = []
    for number, row in rows:
        row_problems = _RowProblems()
        messages = row_to_messages(row, spec.format, row_problems)
        for field, why in row_problems.items:
            where = f", field {field}" if field else ""
            problems.append(f"file {spec.uri}, row {number}{where}: {why}")
        if not row_problems.items:
            examples.append(Example(messages, spec.uri, number))
    if not rows:
        problems.append(f"file {spec.uri}: no rows")
    return examples, problems


def sample_indices(n_rows: int, samples: int | None, rng: random.Random) -> list[int]:
    """All rows, or N of them: whole repeats of the file, then a seeded sample of the remainder."""
    if samples is None:
        return list(range(n_rows))
    repeats, rest = divmod(samples, n_rows)
    return list(range(n_rows)) * repeats + sorted(rng.sample(range(n_rows), rest))


def fetch(uri: str, store: ObjectStore, s3: S3Config | None) -> bytes:
    source, key = resolve_uri(uri, store, s3)
    return source.get(key)


def load_training_examples(
    specs: list[DatasetSpec], store: ObjectStore, s3: S3Config | None, seed: int
) -> tuple[list[Example], list[DatasetReport]]:
    """Read, check, sample and mix every dataset; DatasetError lists every problem in every file."""
    problems: list[str] = []
    per_file: list[tuple[DatasetSpec, list[Example], str]] = []
    for spec in specs:
        try:
            data = fetch(spec.uri, store, s3)
        except ObjectNotFound:
            problems.append(f"file {spec.uri}: not found")
            continue
        except StoreError as exc:
            problems.append(f"file {spec.uri}: cannot be read: {exc}")
            continue
        examples, file_problems = read_dataset(spec, data)
        problems += file_problems
        per_file.append((spec, examples, hashlib.sha256(data).hexdigest()))
    if problems:
        raise DatasetError(problems)
    mixed: list[Example] = []
    reports: list[DatasetReport] = []
    for index, (spec, examples, digest) in enumerate(per_file):
        picked = sample_indices(len(examples), spec.samples, random.Random(seed * 1_000_003 + index))
        mixed += [examples[i] for i in picked]
        reports.append(DatasetReport(spec.uri, spec.format, digest, len(examples), len(picked)))
    # One seeded shuffle interleaves the datasets; each epoch reshuffles in the training loop.
    random.Random(seed).shuffle(mixed)
    if not mixed:
        raise DatasetError(["the datasets hold no usable rows"])
    return mixed, reports
