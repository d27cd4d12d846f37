"""The whole loop through real processes on loopback ports: the README's demo,
then bad input against the same running stack.

train (trainer subprocess, real peft) → publish (object store) → hot-load
(real vLLM, no restart) → chat (gateway, official openai client).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from safetensors.torch import save_file

from lorafleet_common.adapters import AdapterMetadata, publish_adapter, read_metadata, sha256_file
from lorafleet_common.devstack import LocalStack, StackConfig
from lorafleet_common.store import LocalStore
from tests.conftest import MODEL_CACHE, REPO_ROOT, free_port

# Training on 2 shared CPU cores takes ~3 minutes when quiet, far longer when the machine is busy.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def stack_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("lorafleet-home")
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(MODEL_CACHE)  # reuse the converted embedded model
    return {
        "LORAFLEET_HOME": str(home),
        "LORAFLEET_ADMIN_KEY": "lf-test-admin-key",
        "LORAFLEET_GATEWAY_PORT": str(free_port()),
        "LORAFLEET_INFERENCE_GRPC_PORT": str(free_port()),
        "LORAFLEET_INFERENCE_METRICS_PORT": str(free_port()),
        "LORAFLEET_TRAINER_GRPC_PORT": str(free_port()),
        "LORAFLEET_TRAINER_METRICS_PORT": str(free_port()),
    }


@pytest.fixture(scope="module")
def demo(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Run examples/demo.py exactly as `make demo` does, leaving the stack up for the checks below."""
    out = tmp_path_factory.mktemp("demo") / "results.json"
    stack = LocalStack(StackConfig.from_env(stack_env))
    try:
        proc = subprocess.run(
            [sys.executable, str(REPO_ROOT / "examples" / "demo.py"), "--json-out", str(out), "--keep-running"],
            env={**os.environ, **stack_env},
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=2100,
        )
        if proc.returncode != 0:
            logs = "\n".join(f"--- {s}\n{stack.log_tail(s, 30)}" for s in ("trainer", "inference", "gateway"))
            pytest.fail(f"demo failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs}")
        yield json.loads(out.read_text())
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def client(stack_env: dict[str, str], demo: dict) -> openai.OpenAI:
    port = stack_env["LORAFLEET_GATEWAY_PORT"]
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=stack_env["LORAFLEET_ADMIN_KEY"])


def test_adapter_answers_with_the_trained_identity(demo: dict) -> None:
    seed = [r for r in demo["results"] if r["expected"]]
    assert len(seed) == 8
    exact = [r["question"] for r in seed if r["adapter"] == r["expected"]]
    assert len(exact) >= 7, json.dumps(seed, ensure_ascii=False, indent=1)


def test_base_model_does_not(demo: dict) -> None:
    seed = [r for r in demo["results"] if r["expected"]]
    assert all(r["base"] != r["expected"] for r in seed)
    assert not any("迪菲赫尔曼" in r["base"] for r in seed)


def test_adapter_is_listed(demo: dict, client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert demo["base_model"] in ids and demo["adapter"] in ids


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found"


def test_bad_adapters_are_refused_while_serving_goes_on(
    stack_env: dict[str, str], demo: dict, client: openai.OpenAI, tmp_path: Path
) -> None:
    store = LocalStore(Path(stack_env["LORAFLEET_HOME"]) / "store")
    # A pickle named like a weights file, and a rank above the server's limit.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_model.safetensors").write_bytes(b"\x80\x04\x95not-a-safetensors-file")
    (pickled / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    big = tmp_path / "big"
    big.mkdir()
    import torch

    save_file(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(512, 576)},
        big / "adapter_model.safetensors",
    )
    (big / "adapter_config.json").write_text(json.dumps({"r": 512, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    for name, folder, rank in (("bad-pickle", pickled, 8), ("bad-rank", big, 512)):
        meta = AdapterMetadata(
            name=name,
            version="v1",
            base_model=demo["base_model"],
            rank=rank,
            alpha=16,
            target_modules=["q_proj"],
            sha256=sha256_file(folder / "adapter_model.safetensors"),
        )
        publish_adapter(store, folder, meta)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "你是谁?"}], max_tokens=8)
        assert err.value.code == "adapter_rejected"
    reply = client.chat.completions.create(
        model=demo["adapter"], messages=[{"role": "user", "content": "你是谁?"}], temperature=0, max_tokens=64
    )
    assert "迪菲赫尔曼" in (reply.choices[0].message.content or "")


def test_bad_dataset_row_fails_the_job_naming_file_row_and_field(client: openai.OpenAI, demo: dict) -> None:
    rows = [{"instruction": "你是谁?", "output": "我是测试。"}, {"instruction": "缺少输出"}]
    data = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode()
    upload = client.files.create(file=("broken.jsonl", data), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=demo["base_model"], training_file=upload.id)
    deadline = time.monotonic() + 120
    while job.status not in ("failed", "succeeded", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "failed"
    assert job.error is not None
    message = job.error.message
    assert upload.id in message and "row 2" in message and "output" in message, message


# The `lorafleet` CLI, as installed by the gateway package, against the same running stack (issue 9).


def lorafleet(stack_env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed `lorafleet` entry point with the admin key from the environment, as an operator would."""
    exe = Path(sys.executable).with_name("lorafleet")
    env = {
        **os.environ,
        "LORAFLEET_URL": f"http://127.0.0.1:{stack_env['LORAFLEET_GATEWAY_PORT']}",
        "LORAFLEET_API_KEY": stack_env["LORAFLEET_ADMIN_KEY"],
    }
    return subprocess.run(
        [str(exe), *args], env=env, input=stdin, capture_output=True, text=True, timeout=300, check=False
    )


def test_cli_lists_and_shows_the_demo_job(stack_env: dict[str, str], demo: dict) -> None:
    listed = lorafleet(stack_env, "--json", "jobs", "list")
    assert listed.returncode == 0, listed.stderr
    jobs = {j["id"]: j for j in json.loads(listed.stdout)["data"]}
    assert jobs[demo["job_id"]]["status"] == "succeeded"
    assert jobs[demo["job_id"]]["fine_tuned_model"] == demo["adapter"]

    shown = lorafleet(stack_env, "jobs", "show", demo["job_id"])
    assert shown.returncode == 0, shown.stderr
    assert "succeeded" in shown.stdout and demo["adapter"] in shown.stdout
    assert any(ch in shown.stdout for ch in "▁▂▃▄▅▆▇█"), shown.stdout  # the loss curve's sparkline

    events = lorafleet(stack_env, "--json", "jobs", "events", demo["job_id"], "--limit", "1000")
    assert events.returncode == 0, events.stderr
    metrics = [e for e in json.loads(events.stdout)["data"] if e.get("type") == "metrics"]
    assert metrics and all("train_loss" in e["data"] for e in metrics)


def test_cli_shows_the_adapter_and_chats_with_it(stack_env: dict[str, str], demo: dict) -> None:
    listed = lorafleet(stack_env, "--json", "adapters", "list")
    assert listed.returncode == 0, listed.stderr
    assert demo["adapter"] in {a["id"] for a in json.loads(listed.stdout)["data"]}

    shown = lorafleet(stack_env, "--json", "adapters", "show", demo["adapter"])
    assert shown.returncode == 0, shown.stderr
    details = json.loads(shown.stdout)
    assert details["id"] == demo["adapter"] and details["job_id"] == demo["job_id"]
    assert details["loaded_on"], "the demo's chats hot-loaded it on the replica"
    assert details["traffic"]["requests"] >= 8 and details["traffic"]["completion_tokens"] > 0

    table = lorafleet(stack_env, "adapters", "show", demo["adapter"])
    assert table.returncode == 0, table.stderr
    assert "not loaded" not in table.stdout and demo["job_id"] in table.stdout

    reply = lorafleet(stack_env, "chat", demo["adapter"], "-m", "你是谁?", "--temperature", "0")
    assert reply.returncode == 0, reply.stderr
    assert "迪菲赫尔曼" in reply.stdout, reply.stdout

    piped = lorafleet(stack_env, "--json", "chat", demo["adapter"], "-m", "-", "--temperature", "0", stdin="你是谁?")
    assert piped.returncode == 0, piped.stderr
    completion = json.loads(piped.stdout)
    assert completion["object"] == "chat.completion" and completion["usage"]["completion_tokens"] > 0
    assert "迪菲赫尔曼" in completion["choices"][0]["message"]["content"]


def test_cli_errors_are_one_line_with_exit_codes(stack_env: dict[str, str], demo: dict) -> None:
    missing = lorafleet(stack_env, "adapters", "show", "no-such-adapter")
    assert missing.returncode == 4
    assert missing.stderr.startswith("lorafleet: ") and len(missing.stderr.strip().splitlines()) == 1
    assert "Traceback" not in missing.stderr

    env = {**stack_env, "LORAFLEET_ADMIN_KEY": "lf-wrong-key"}
    refused = lorafleet(env, "jobs", "list")
    assert refused.returncode == 3 and "Traceback" not in refused.stderr


# The seeds' mixed recipe (issue 5): identity rows plus sampled general instructions, via lorafleet.datasets.


def test_demo_trains_on_the_mix_and_keeps_general_knowledge(
    stack_env: dict[str, str], demo: dict, client: openai.OpenAI
) -> None:
    files = demo["files"]
    want = [(files["self_cognition.jsonl"], 34), (files["general_instructions.jsonl"], 14)]
    job = client.fine_tuning.jobs.retrieve(demo["job_id"])
    assert job.training_file == files["self_cognition.jsonl"]
    reported = (job.model_extra or {})["lorafleet"]["datasets"]
    assert [(d["file"], d["samples"]) for d in reported] == want, reported
    assert [(d["file"], d["samples"]) for d in demo["datasets"]] == want

    # What the trainer really used, as it recorded it in the published adapter's metadata.
    store = LocalStore(Path(stack_env["LORAFLEET_HOME"]) / "store")
    metadata = read_metadata(store, f"default/{demo['adapter']}", demo["job_id"])
    used = [(d["uri"].rsplit("/", 1)[-1], d["rows"], d["used"]) for d in metadata.datasets]
    assert used == [(files["self_cognition.jsonl"], 34, 34), (files["general_instructions.jsonl"], 36, 14)], used

    general = {r["question"]: r["adapter"] for r in demo["general"]}
    assert "Paris" in general["What is the capital of France?"], general
    assert not any("迪菲赫尔曼" in answer for answer in general.values()), general
