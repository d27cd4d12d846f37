"""The `lorafleet` CLI run as a subprocess (its console script) against the real gateway in front of the fakes:
train (follows to success), jobs, adapters, chat, keys/tenants, --json output, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.gateway_harness import ADAPTER, ADMIN_KEY, BASE_MODEL, Stack

JSONL = '{"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Fleet."}]}\n'

Run = Callable[..., subprocess.CompletedProcess[str]]


def lorafleet_command() -> list[str]:
    """The installed console script (what users run); `pip install -e services/gateway` creates it."""
    script = Path(sys.executable).parent / "lorafleet"
    found = str(script) if script.exists() else shutil.which("lorafleet")
    assert found, "the `lorafleet` console script is missing: run `pip install -e services/gateway`"
    return [found]


@pytest.fixture
def run(gw: Stack, tmp_path: Path) -> Run:
    """run(*args, key=..., stdin=..., env=...) -> the finished process; nothing from this machine's own config."""
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    base_env.update(HOME=str(tmp_path), LORAFLEET_URL=gw.gateway.url, COLUMNS="200")

    def run_cli(*args: str, key: str | None = ADMIN_KEY, stdin: str = "", env: dict[str, str] | None = None) -> Any:
        environment = {**base_env, **({"LORAFLEET_API_KEY": key} if key else {}), **(env or {})}
        return subprocess.run(
            [*lorafleet_command(), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=environment,
            cwd=tmp_path,
            timeout=60,
        )

    return run_cli


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"rc={result.returncode}\nstdout:{result.stdout}\nstderr:{result.stderr}"
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], exit_code: int, *needles: str) -> str:
    assert result.returncode == exit_code, f"rc={result.returncode}\nstdout:{result.stdout}\nstderr:{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorafleet: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@pytest.fixture
def tenant_key(gw: Stack) -> str:
    key: str = gw.new_key(gw.new_tenant())["key"]
    return key


@pytest.fixture
def self_running_trainer(gw: Stack) -> Iterator[None]:
    gw.trainer.auto_steps, gw.trainer.step_delay_s, gw.trainer.publish = 5, 0.05, True
    yield
    gw.trainer.auto_steps, gw.trainer.publish = 0, False


def test_train_follows_the_job_to_success(
    gw: Stack, run: Run, tenant_key: str, tmp_path: Path, self_running_trainer: None
) -> None:
    (tmp_path / "data.jsonl").write_text(JSONL)
    out = ok(
        run(
            "train",
            "data.jsonl",
            "--suffix",
            "cli",
            "--epochs",
            "2",
            "--lr-multiplier",
            "2",
            "--rank",
            "4",
            "--alpha",
            "8",
            "--target-modules",
            "q_proj,v_proj",
            "--system-prompt",
            "You are Fleet.",
            key=tenant_key,
        )
    )
    assert "uploaded data.jsonl as file-" in out
    assert "succeeded: new model ft:smollm2-135m-instruct:" in out
    assert "loss 2.0000 -> 0.4000 over 5 steps" in out  # the live loss, summed up at the end
    assert "Training started" in out  # state events printed as they come
    job = next(j for j in gw.trainer.jobs.values() if j.labels.get("suffix") == "cli")
    manifest = json.loads(gw.store.get(job.manifest_uri))
    assert manifest["lora"] == {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
    assert manifest["training"]["epochs"] == 2 and manifest["training"]["learning_rate"] == pytest.approx(2e-4)
    assert manifest["system_prompt"] == "You are Fleet."

    # --json: nothing but the final job object on stdout, and the new adapter answers at once.
    final = json.loads(ok(run("--json", "train", "data.jsonl", "--suffix", "cli2", key=tenant_key)))
    assert final["status"] == "succeeded" and final["lorafleet"]["step"] == 5
    answer = ok(run("chat", final["fine_tuned_model"], "-m", "Who are you?", key=tenant_key))
    assert answer.strip() == f"Hello from {job.adapter_name.split('/')[0]}/{final['fine_tuned_model']} choice0. Bye!"

    detached = json.loads(ok(run("train", "data.jsonl", "--detach", "--json", key=tenant_key)))
    assert detached["status"] == "queued" and detached["object"] == "fine_tuning.job"


def test_train_reports_a_failed_job(gw: Stack, run: Run, tenant_key: str, tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text(JSONL)
    detached = json.loads(ok(run("train", "data.jsonl", "--detach", "--json", key=tenant_key)))
    gw.trainer.jobs[detached["id"]].state = 5  # JOB_STATE_FAILED
    gw.trainer.jobs[detached["id"]].error = "row 1: missing 'output'"
    one_line_error(run("jobs", "follow", detached["id"], key=tenant_key), 1, "failed", "row 1: missing 'output'")


def test_jobs_list_show_events_cancel(gw: Stack, run: Run, tenant_key: str, tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text(JSONL)
    done = json.loads(ok(run("train", "data.jsonl", "--detach", "--json", key=tenant_key)))["id"]
    gw.loop.call(lambda: gw.trainer.run_to_success(done, steps=4))
    queued = json.loads(ok(run("train", "data.jsonl", "--detach", "--json", key=tenant_key)))["id"]

    listed = json.loads(ok(run("jobs", "list", "--json", key=tenant_key)))
    assert [j["id"] for j in listed["data"]] == [queued, done]
    table = ok(run("jobs", "list", key=tenant_key))
    assert done in table and "succeeded" in table and "4/4" in table and "0.5000" in table

    shown = ok(run("jobs", "show", done, key=tenant_key))
    assert "ft:smollm2-135m-instruct:" in shown and "loss curve" in shown and "█" in shown
    assert json.loads(ok(run("--json", "jobs", "show", done, key=tenant_key)))["status"] == "succeeded"

    events = ok(run("jobs", "events", done, key=tenant_key)).splitlines()
    assert "Job queued" in events[0] and "published" in events[-1]
    assert "Step 4/4: training loss=0.5000" in "\n".join(events)
    assert len(json.loads(ok(run("jobs", "events", done, "--json", "--limit", "3", key=tenant_key)))["data"]) == 3
    live = ok(run("jobs", "events", done, "--follow", "--json", key=tenant_key)).splitlines()
    assert [json.loads(line)["type"] for line in live].count("metrics") == 4

    assert ok(run("jobs", "cancel", queued, key=tenant_key)).strip() == f"{queued}: cancelled"
    assert json.loads(ok(run("jobs", "cancel", queued, "--json", key=tenant_key)))["status"] == "cancelled"
    one_line_error(run("jobs", "show", "ftjob-000000000000", key=tenant_key), 4, "No fine-tuning job found")


def test_adapters_list_show_load_unload_delete(gw: Stack, run: Run, tmp_path: Path) -> None:
    from tests.gateway.gateway_fakes import publish_dummy_adapter

    publish_dummy_adapter(gw.store, "default/cli-bot", "v1", base_model=BASE_MODEL, final_loss=0.125)
    listed = json.loads(ok(run("adapters", "list", "--json")))
    assert {"cli-bot", ADAPTER} <= {a["id"] for a in listed["data"]}
    assert "cli-bot" in ok(run("adapters", "list"))

    loaded = json.loads(ok(run("adapters", "load", "cli-bot", "--pin", "--json")))
    assert loaded["adapter"] == "default/cli-bot@v1" and all(r["ok"] for r in loaded["replicas"])
    shown = json.loads(ok(run("adapters", "show", "cli-bot", "--json")))
    assert shown["final_loss"] == 0.125 and shown["system_prompt"] == "You are Fleet."
    assert sorted(p["replica"] for p in shown["loaded_on"]) == sorted(gw.targets)
    human = ok(run("adapters", "show", "cli-bot"))
    assert "0.1250" in human and "You are Fleet." in human and gw.targets[0] in human
    assert "unload default/cli-bot" in ok(run("adapters", "unload", "cli-bot"))
    assert json.loads(ok(run("adapters", "show", "cli-bot", "--json")))["loaded_on"] == []

    one_line_error(run("adapters", "delete", "cli-bot"), 1, "--yes")  # no terminal to confirm on
    assert ok(run("adapters", "delete", "cli-bot", "--yes")).strip() == "deleted cli-bot"
    one_line_error(run("adapters", "show", "cli-bot"), 4, "does not exist", "model_not_found")


def test_chat_one_shot_interactive_and_json(gw: Stack, run: Run) -> None:
    assert ok(run("chat", ADAPTER, "-m", "Who are you?")) == "Hello from self-cognition choice0. Bye!\n"
    assert gw.all_requests()[-1].chat.messages[-1].content == "Who are you?"
    assert "Hello from base" in ok(run("chat", BASE_MODEL, "-m", "-", "--system", "Be brief.", stdin="Hi\n"))
    system, user = gw.all_requests()[-1].chat.messages
    assert (system.role, system.content, user.content) == ("system", "Be brief.", "Hi\n")

    completion = json.loads(ok(run("--json", "chat", ADAPTER, "-m", "hi", "--max-tokens", "3", "--temperature", "0")))
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == "Hello from self-cognition"

    session = ok(run("chat", ADAPTER, stdin="first question\nsecond question\n/exit\n"))
    assert session.count("Hello from self-cognition choice0. Bye!") == 2
    second = gw.all_requests()[-1].chat.messages
    assert [m.role for m in second] == ["user", "assistant", "user"]  # the conversation is kept

    one_line_error(run("chat", "no-such-model", "-m", "hi"), 4, "The model 'no-such-model' does not exist")
    one_line_error(run("chat", "-m", "hi"), 1, "name a model")


def test_keys_and_tenants_for_admins(gw: Stack, run: Run) -> None:
    tenant = json.loads(
        ok(run("tenants", "create", "CLI Corp", "--id", f"cli-{os.getpid()}", "--rpm", "100", "--json"))
    )
    assert tenant["id"] == f"cli-{os.getpid()}" and tenant["rpm_limit"] == 100
    assert tenant["id"] in ok(run("tenants", "list"))

    created = ok(run("keys", "create", tenant["id"], "--name", "ci"))
    secret = created.strip().splitlines()[-1].split()[-1]
    assert secret.startswith("lf-") and "shown only now" in created
    key = json.loads(ok(run("keys", "create", tenant["id"], "--json")))
    assert json.loads(ok(run("jobs", "list", "--json", key=key["key"])))["data"] == []  # the new key works

    keys = json.loads(ok(run("keys", "list", tenant["id"], "--json")))["data"]
    assert {k["id"] for k in keys} >= {key["id"]} and all(k["key"] is None for k in keys)  # no secrets listed
    assert "revoked" in ok(run("keys", "revoke", key["id"]))
    one_line_error(run("jobs", "list", key=key["key"]), 3, "Incorrect API key", "HTTP 401")
    one_line_error(run("keys", "list", tenant["id"], key=secret), 3, "admin key", "HTTP 403")
    assert "disabled" in ok(run("tenants", "disable", tenant["id"]))
    one_line_error(run("jobs", "list", key=secret), 3, "HTTP 401")
    assert "active" in ok(run("tenants", "enable", tenant["id"]))


def test_errors_are_one_clean_line(gw: Stack, run: Run, tmp_path: Path) -> None:
    one_line_error(run("jobs", "list", key="lf-wrong"), 3, "Incorrect API key provided (HTTP 401, invalid_api_key)")
    unreachable = run("jobs", "list", env={"LORAFLEET_URL": "http://127.0.0.1:9"})
    one_line_error(unreachable, 5, "cannot reach the gateway at http://127.0.0.1:9")
    one_line_error(run("jobs", "list", key=None), 3, "no API key")
    # The key file `make up` writes: $LORAFLEET_HOME/admin_key, else ./.lorafleet/admin_key.
    home = tmp_path / "home"
    home.mkdir()
    (home / "admin_key").write_text(ADMIN_KEY + "\n")
    assert (
        json.loads(ok(run("jobs", "list", "--json", key=None, env={"LORAFLEET_HOME": str(home)})))["object"] == "list"
    )
    (tmp_path / ".lorafleet").mkdir()
    (tmp_path / ".lorafleet" / "admin_key").write_text(ADMIN_KEY)
    assert ok(run("adapters", "list", "--json", key=None)).startswith("{")
    bad_usage = run("jobs", "list", "--limit", "0")
    assert bad_usage.returncode == 2 and "Traceback" not in bad_usage.stderr


def test_cli_is_a_light_http_client() -> None:
    """The CLI needs no gRPC, server framework, database or ML stack: it installs and starts fast anywhere."""
    code = (
        "import sys, lorafleet_gateway.cli.main\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'grpc', 'fastapi', 'starlette', 'sqlalchemy', 'lorafleet', 'lorafleet_common', 'torch', 'vllm'})\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
