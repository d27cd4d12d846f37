"""Dataset reading: every format, auto-detection, sampling, seeded mixing, and complete problem reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafleet_common.store import LocalStore
from lorafleet_trainer.datasets import DatasetError, Message, load_training_examples
from lorafleet_trainer.manifest import DatasetSpec


def _jsonl(rows: list[object]) -> bytes:
    return "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode() + b"\n"


def _load(store: LocalStore, *specs: DatasetSpec, seed: int = 42) -> list[tuple[Message, ...]]:
    examples, _ = load_training_examples(list(specs), store, None, seed)
    return [e.messages for e in examples]


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def test_alpaca_with_input_system_and_history(store: LocalStore) -> None:
    row = {
        "instruction": "Translate",
        "input": "bonjour",
        "output": "hello",
        "system": "Be brief.",
        "history": [["hi", "hello!"]],
    }
    store.put("a.jsonl", _jsonl([row]))
    [messages] = _load(store, DatasetSpec(uri="a.jsonl", format="alpaca"))
    assert messages == (
        Message("system", "Be brief."),
        Message("user", "hi"),
        Message("assistant", "hello!"),
        Message("user", "Translate\nbonjour"),
        Message("assistant", "hello"),
    )


def test_sharegpt_and_messages_formats(store: LocalStore) -> None:
    store.put(
        "s.json",
        json.dumps(
            [
                {
                    "conversations": [
                        {"from": "system", "value": "S"},
                        {"from": "human", "value": "q"},
                        {"from": "gpt", "value": "a"},
                    ]
                }
            ]
        ).encode(),
    )
    store.put(
        "m.jsonl",
        _jsonl(
            [
                {
                    "messages": [
                        {"role": "user", "content": "q1"},
                        {"role": "assistant", "content": "a1", "weight": 0},
                        {"role": "user", "content": "q2"},
                        {"role": "assistant", "content": "a2"},
                    ]
                }
            ]
        ),
    )
    [sharegpt] = _load(store, DatasetSpec(uri="s.json", format="sharegpt"))
    assert sharegpt == (Message("system", "S"), Message("user", "q"), Message("assistant", "a"))
    [messages] = _load(store, DatasetSpec(uri="m.jsonl", format="messages"))
    assert messages[1] == Message("assistant", "a1", train=False) and messages[3].train


def test_auto_detects_the_format_per_row(store: LocalStore) -> None:
    store.put(
        "mixed.jsonl",
        _jsonl(
            [
                {"instruction": "q1", "output": "a1"},
                {"conversations": [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]},
                {"messages": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}]},
            ]
        ),
    )
    rows = _load(store, DatasetSpec(uri="mixed.jsonl"))
    assert sorted(m[-1].content for m in rows) == ["a1", "a2", "a3"]


def test_oversampling_repeats_whole_rows_then_samples(store: LocalStore) -> None:
    store.put("d.jsonl", _jsonl([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(4)]))
    rows = _load(store, DatasetSpec(uri="d.jsonl", samples=10))
    answers = [m[-1].content for m in rows]
    assert len(answers) == 10
    # 10 = 2 whole copies of the 4 rows + 2 sampled ones
    assert all(answers.count(f"a{i}") in (2, 3) for i in range(4))
    assert sum(answers.count(f"a{i}") == 3 for i in range(4)) == 2
    under = _load(store, DatasetSpec(uri="d.jsonl", samples=3))
    assert len({m[-1].content for m in under}) == 3


def test_mixing_is_a_deterministic_seeded_shuffle(store: LocalStore) -> None:
    store.put("a.jsonl", _jsonl([{"instruction": f"a{i}", "output": "x"} for i in range(20)]))
    store.put("b.jsonl", _jsonl([{"instruction": f"b{i}", "output": "y"} for i in range(20)]))
    specs = [DatasetSpec(uri="a.jsonl"), DatasetSpec(uri="b.jsonl", samples=30)]
    first = _load(store, *specs, seed=7)
    assert first == _load(store, *specs, seed=7)
    assert first != _load(store, *specs, seed=8)
    sources = [m[0].content[0] for m in first]
    assert sources.count("a") == 20 and sources.count("b") == 30
    assert sources[:20] != ["a"] * 20  # interleaved, not concatenated


def test_reports_carry_digest_and_counts(store: LocalStore) -> None:
    data = _jsonl([{"instruction": "q", "output": "a"}])
    store.put("d.jsonl", data)
    _, [report] = load_training_examples([DatasetSpec(uri="d.jsonl", samples=5)], store, None, 1)
    import hashlib

    assert report.as_metadata() == {
        "uri": "d.jsonl",
        "format": "auto",
        "sha256": hashlib.sha256(data).hexdigest(),
        "rows": 1,
        "used": 5,
    }


def test_file_uri_is_read(tmp_path: Path, store: LocalStore) -> None:
    path = tmp_path / "outside.jsonl"
    path.write_bytes(_jsonl([{"instruction": "q", "output": "a"}]))
    assert len(_load(store, DatasetSpec(uri=path.as_uri()))) == 1


def test_every_bad_row_in_every_file_is_reported(store: LocalStore) -> None:
    lines = [
        json.dumps({"instruction": "ok", "output": "fine"}),
        '{"instruction": "broken json",',
        json.dumps({"instruction": "no output"}),
        json.dumps({"instruction": 5, "output": "x"}),
        json.dumps({"messages": []}),
        json.dumps({"messages": [{"role": "robot", "content": "hi"}]}),
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}),
        json.dumps({"messages": [{"role": "user", "content": ["not", "text"]}, {"role": "assistant", "content": "a"}]}),
        json.dumps({"something": "else"}),
        json.dumps({"conversations": [{"from": "human", "value": "q"}]}),
        json.dumps([1, 2]),
    ]
    store.put("bad.jsonl", ("\n".join(lines) + "\n").encode())
    store.put("empty.jsonl", b"\n")
    with pytest.raises(DatasetError) as info:
        _load(store, DatasetSpec(uri="bad.jsonl"), DatasetSpec(uri="empty.jsonl"), DatasetSpec(uri="missing.jsonl"))
    problems = info.value.problems
    expected = [
        "file bad.jsonl, row 2: invalid JSON",
        "file bad.jsonl, row 3, field output: is required",
        "file bad.jsonl, row 4, field instruction: must be a string, got int",
        "file bad.jsonl, row 5, field messages: empty conversation",
        "file bad.jsonl, row 6, field messages[0].role: unknown role 'robot'",
        "file bad.jsonl, row 7, field messages[1].role: expected role 'assistant', got 'user'",
        "file bad.jsonl, row 8, field messages[0].content: must be a string, got list",
        "file bad.jsonl, row 9: cannot detect the format",
        "file bad.jsonl, row 10, field conversations[0].from: conversation must end with an assistant turn",
        "file bad.jsonl, row 11: must be a JSON object, got list",
        "file empty.jsonl: no rows",
        "file missing.jsonl: not found",
    ]
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start), (problem, start)
    assert str(info.value).startswith("dataset validation failed (12 problems): file bad.jsonl, row 2")


def test_explicit_format_mismatch_names_the_missing_field(store: LocalStore) -> None:
    store.put("d.jsonl", _jsonl([{"instruction": "q", "output": "a"}]))
    with pytest.raises(DatasetError) as info:
        _load(store, DatasetSpec(uri="d.jsonl", format="messages"))
    assert info.value.problems == ["file d.jsonl, row 1, field messages: is required"]
