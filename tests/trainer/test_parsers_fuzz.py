"""Hostile input into the trainer's parsers (hypothesis): the manifest parser and the dataset readers.

Whatever the bytes, ``parse_manifest`` returns a manifest or raises ManifestError, and the dataset
readers report problems (``load_training_examples`` raises DatasetError): never another exception,
never a hang, and every message is short, names where the problem is and can travel in a gRPC
status (UTF-8, a few KiB). Examples are derandomized (the same on every run, so CI is reproducible)
and bounded in number; deadlines are off because the shared 2-core machine makes timings noisy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafleet_common.store import LocalStore
from lorafleet_trainer.datasets import (
    DatasetError,
    _RowProblems,
    load_training_examples,
    read_dataset,
    row_to_messages,
)
from lorafleet_trainer.manifest import DatasetSpec, JobManifest, ManifestError, parse_manifest

FUZZ = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
MAX_MESSAGE_CHARS = 8_000  # gRPC status details ride in metadata (8 KiB by default)
FORMATS = ["alpaca", "sharegpt", "messages", "auto"]
VALID = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "adapter_name": "t/a", "datasets": ["files/t/x"]}
DEEP = 100_000  # nesting far past the interpreter's recursion limit

# Scalars that are plain text to a person but typed values to YAML (and some that its constructors refuse).
YAML_TRAPS = [
    "2001-13-45",
    "2001-02-30",
    "2001-12-14t25:59:43.10-05:00",
    "1" * 5000,
    "0x" + "f" * 5000,
    "190:20:30",
    ".inf",
    "-.nan",
    "~",
    "!!binary '%%%'",
    "!!python/object:os.system x",
    "!!set {a, b}",
    "&a [1, *a]",
    "*missing",
    "? [a, b]",
    "<<: 5",
    "\x00",
    "\ufeff",
    "'\\ud800'",
    '"\\ud800"',
    "[" * 600,  # past the recursion limit already: YAML spends several frames per level
    "{a: " * 600,
]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(["", " ", "\u2028", "\ud800", "x" * 20_000, "../../etc/passwd", "file:///etc/passwd", "s3://b/k"])
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)


def _deep(levels: int) -> Any:
    value: Any = "x"
    for _ in range(levels):
        value = [value]
    return value


def assert_precise(exc: ValueError, prefix: str) -> None:
    message = str(exc)
    assert message.startswith(prefix), message[:200]
    assert len(message) <= MAX_MESSAGE_CHARS, len(message)
    message.encode("utf-8")  # lone surrogates would make gRPC fail to send the status
    problems: list[str] = getattr(exc, "problems", [])
    assert problems and all(p.strip() for p in problems)


def check_manifest(data: bytes) -> None:
    try:
        manifest = parse_manifest(data, max_lora_rank=64)
    except ManifestError as exc:
        assert_precise(exc, "invalid manifest: ")
        # Every problem names a field path (or "manifest" for the document as a whole).
        assert all(": " in p for p in exc.problems), exc.problems
    else:
        assert isinstance(manifest, JobManifest)


@FUZZ
@given(st.binary(max_size=2_000))
def test_manifest_from_arbitrary_bytes(data: bytes) -> None:
    check_manifest(data)


@FUZZ
@given(json_values)
def test_manifest_from_arbitrary_json(value: Any) -> None:
    check_manifest(json.dumps(value).encode())


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from([*VALID, "system_prompt", "labels", "lora", "training", "extra"]) | st.text(max_size=8),
        json_values,
        max_size=4,
    ),
    st.dictionaries(st.sampled_from(["rank", "alpha", "dropout", "target_modules", "nope"]), json_values, max_size=3),
    st.dictionaries(
        st.sampled_from(["epochs", "learning_rate", "batch_size", "max_length", "seed", "warmup_ratio", "nope"]),
        json_values,
        max_size=3,
    ),
)
def test_manifest_with_fields_of_the_wrong_type(top: dict[str, Any], lora: dict[str, Any], training: Any) -> None:
    """A valid manifest with some fields replaced: type confusion field by field."""
    manifest = {**VALID, "lora": lora, "training": training, **top}
    check_manifest(json.dumps(manifest).encode())


@FUZZ
@given(
    st.lists(st.sampled_from(YAML_TRAPS) | st.text(max_size=20), min_size=1, max_size=4), st.sampled_from(list(VALID))
)
def test_manifest_from_yaml_traps(values: list[str], field: str) -> None:
    """YAML documents whose scalars YAML types on its own: dates, sexagesimals, 5000-digit ints, tags, aliases."""
    lines = [f"{k}: {v}" for k, v in VALID.items() if k != field and k != "datasets"]
    lines += ["datasets:", "  - files/t/x"] if field != "datasets" else []
    lines += [f"{field}: {values[0]}", *(f"k{i}: {v}" for i, v in enumerate(values[1:]))]
    check_manifest("\n".join(lines).encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize(
    "data",
    [
        b"[" * DEEP,
        b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
        b"a: " + b"[" * 1_000,
        b'{"base_model": ' + b"1" * 5_000 + b"}",
        b"base_model: 2001-13-45",
        b"base_model: 2001-02-30\nadapter_name: a",
        b"labels: {x: 2001-12-14t25:59:43.10-05:00}",
        json.dumps({**VALID, **{f"unknown{i}": i for i in range(5_000)}}).encode(),
        json.dumps({**VALID, "adapter_name": "n" * 1_000_000}).encode(),
        json.dumps({**VALID, "\ud800": 1, "labels": {"a": "\ud800"}}).encode(),
        json.dumps({**VALID, "lora": {"target_modules": _deep(500)}}).encode(),
    ],
    ids=[
        "deep-json-array",
        "deep-json-object",
        "deep-yaml",
        "5000-digit-int",
        "yaml-month-13",
        "yaml-feb-30",
        "yaml-hour-25",
        "5000-unknown-keys",
        "1mb-adapter-name",
        "lone-surrogates",
        "deep-lora-field",
    ],
)
def test_manifest_regressions(data: bytes) -> None:
    """Inputs that crashed parse_manifest (RecursionError, ValueError) or gave unbounded messages."""
    with pytest.raises(ManifestError) as caught:
        parse_manifest(data, max_lora_rank=64)
    assert_precise(caught.value, "invalid manifest: ")


# ----- datasets -----------------------------------------------------------------------------------

text_with_line_breaks = st.text(
    alphabet=st.characters(codec="utf-8") | st.sampled_from(["\u2028", "\u2029", "\u0085", "\x1c", "\r", "\n"]),
    min_size=1,
    max_size=30,
).filter(lambda s: s.strip())
valid_messages_rows = st.lists(st.tuples(text_with_line_breaks, text_with_line_breaks), min_size=1, max_size=3).map(
    lambda turns: {
        "messages": [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    }
)
row_like = st.fixed_dictionaries(
    {},
    optional={
        "messages": st.lists(
            st.dictionaries(st.sampled_from(["role", "content", "weight", "x"]), json_values, max_size=4), max_size=4
        )
        | json_values,
        "conversations": st.lists(
            st.dictionaries(st.sampled_from(["from", "value", "weight"]), json_values, max_size=3), max_size=4
        )
        | json_values,
        "instruction": json_values,
        "input": json_values,
        "output": json_values,
        "system": json_values,
        "history": st.lists(st.lists(json_values, max_size=3), max_size=3) | json_values,
    },
)


def encode_jsonl(rows: list[Any], newline: str, bom: bool) -> bytes:
    text = newline.join(json.dumps(row, ensure_ascii=False) for row in rows)
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", "surrogatepass")


def check_rows(data: bytes, fmt: str) -> tuple[int, list[str]]:
    """read_dataset never raises; every problem says which file, which row (or the file as a whole)."""
    examples, problems = read_dataset(DatasetSpec(uri="files/t/x", format=fmt), data)
    for problem in problems:
        assert problem.startswith("file files/t/x"), problem
        assert len(problem) <= 1_000, len(problem)
    return len(examples), problems


@FUZZ
@given(st.binary(max_size=3_000), st.sampled_from(FORMATS))
def test_dataset_from_arbitrary_bytes(data: bytes, fmt: str) -> None:
    check_rows(data, fmt)


@settings(FUZZ, max_examples=80)  # the costliest strategy here: fewer, larger examples
@given(
    st.lists(row_like | json_values, min_size=1, max_size=6),
    st.sampled_from(FORMATS),
    st.sampled_from(["\n", "\r\n", "\r"]),
    st.booleans(),
    st.binary(max_size=4),
)
def test_dataset_rows_of_every_shape(rows: list[Any], fmt: str, newline: str, bom: bool, junk: bytes) -> None:
    """Rows that look like each format with fields of any type, in JSONL or a JSON array, junk appended."""
    check_rows(encode_jsonl(rows, newline, bom), fmt)
    check_rows(json.dumps(rows).encode() + junk, fmt)
    for row in rows:  # the row converter on its own, as auto-detection calls it
        row_to_messages(row, fmt, _RowProblems())


@FUZZ
@given(st.lists(valid_messages_rows, min_size=1, max_size=4), st.sampled_from(["\n", "\r\n"]), st.booleans())
def test_valid_rows_survive_any_unicode(rows: list[dict[str, Any]], newline: str, bom: bool) -> None:
    """Every valid row is read back exactly, whatever characters its strings hold (U+2028, NEL...)."""
    count, problems = check_rows(encode_jsonl(rows, newline, bom), "messages")
    assert problems == [] and count == len(rows)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"[" * DEEP, "nested too deeply"),
        (b"[" + b"[" * DEEP, "nested too deeply"),
        (b'{"messages":' * 3_000 + b"1" + b"}" * 3_000, "nested too deeply"),
        ('{"instruction": "a", "output": "b\u2028c"}'.encode(), None),
        ('{"instruction": "a", "output": "b\u0085c"}'.encode(), None),
        (b'{"instruction": "\\ud800", "output": "b"}', "unpaired UTF-16 surrogate"),
        (b'{"messages": [{"role": "' + b"r" * 1_000_000 + b'", "content": "a"}]}', "unknown role 'rrrr"),
        (json.dumps({"messages": [{"role": _deep(500), "content": "a"}]}).encode(), "unknown role of type list"),
        (b'{"instruction": "' + b"\xff" * 3 + b'", "output": "b"}', "not UTF-8 text"),
        (b"\xef\xbb\xbf" + b'{"instruction": "a", "output": "b"}\r\n' * 3, None),
    ],
    ids=[
        "deep-line",
        "deep-array-file",
        "deep-object",
        "raw-u2028",
        "raw-nel",
        "lone-surrogate",
        "1mb-role",
        "deep-role",
        "invalid-utf8",
        "bom-crlf",
    ],
)
def test_dataset_regressions(data: bytes, expected: str | None) -> None:
    """Inputs that crashed the reader (RecursionError), split valid rows, or let bad text through."""
    count, problems = check_rows(data, "auto")
    if expected is None:
        assert problems == [] and count >= 1
    else:
        assert count == 0 and any(expected in p for p in problems), problems


@settings(FUZZ, max_examples=40)
@given(st.lists(st.binary(max_size=500) | st.sampled_from([b"[" * DEEP, b'{"messages": []}', b""]), max_size=3))
def test_load_training_examples_raises_only_dataset_error(
    tmp_path_factory: pytest.TempPathFactory, files: list[bytes]
) -> None:
    """The loader over real store files (plus a missing one): DatasetError with every problem, or examples."""
    store = LocalStore(Path(tmp_path_factory.mktemp("fuzz-store")))
    specs = [DatasetSpec(uri="files/t/missing")]
    for i, data in enumerate(files):
        store.put(f"files/t/{i}", data)
        specs.append(DatasetSpec(uri=f"files/t/{i}"))
    with pytest.raises(DatasetError) as caught:
        load_training_examples(specs, store, None, seed=1)
    assert_precise(caught.value, "dataset validation failed")
    assert any("files/t/missing: not found" in p for p in caught.value.problems)


def test_valid_manifests_still_parse() -> None:
    """The fuzzers above must not pass because everything is refused: a valid manifest parses, as YAML too."""
    assert parse_manifest(json.dumps(VALID).encode(), max_lora_rank=64).adapter_name == "t/a"
    assert parse_manifest(yaml.safe_dump(VALID).encode(), max_lora_rank=64).datasets[0].uri == "files/t/x"
    # "#N" counts rows only with ASCII digits (int() refuses '²', which str.isdigit() accepts): else it is a name.
    superscript = parse_manifest(json.dumps({**VALID, "datasets": ["files/t/x#\u00b2"]}).encode(), max_lora_rank=64)
    assert (superscript.datasets[0].uri, superscript.datasets[0].samples) == ("files/t/x#\u00b2", None)
