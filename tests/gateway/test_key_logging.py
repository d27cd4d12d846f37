"""API keys never reach the logs: a real gateway process logging at DEBUG (every library included) is driven
through the key lifecycle (admin key, tenant keys created, used, listed, changed, revoked, wrong and
malformed keys, and a broken database while keys are looked up and created), then everything it wrote to
stderr is searched for each key, the secret part of each key, and each key's sha256 (what the database
stores)."""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.gateway.test_files_fine_tuning import JSONL
from tests.service_processes import http_probe, start_service

KEYS_TABLE = "gateway_api_keys"


@pytest.fixture
def gateway_process(tmp_path: Path, unused_port: Callable[[], int]) -> Iterator[tuple[str, str, Path, Path]]:
    """(url, admin key, stderr file, database file) of `python -m lorafleet_gateway` at LORAFLEET_LOG_LEVEL=DEBUG."""
    admin_key = "lf-admin-" + secrets.token_urlsafe(24)
    port = unused_port()
    database = tmp_path / "gateway.db"
    env = {
        **os.environ,
        "LORAFLEET_HOME": str(tmp_path),
        "LORAFLEET_ADMIN_KEY": admin_key,
        "LORAFLEET_LOG_LEVEL": "DEBUG",
        "LORAFLEET_GATEWAY_HOST": "127.0.0.1",
        "LORAFLEET_GATEWAY_PORT": str(port),
        # Nothing listens there: generation answers 503, which is logged too.
        "LORAFLEET_GATEWAY_INFERENCE_TARGETS": f"127.0.0.1:{unused_port()}",
        "LORAFLEET_GATEWAY_TRAINER_TARGET": f"127.0.0.1:{unused_port()}",
        "LORAFLEET_GATEWAY_CONNECT_TIMEOUT_S": "1",
        "LORAFLEET_GATEWAY_DATABASE_URL": f"sqlite:///{database}",
        "LORAFLEET_GATEWAY_AUTH_CACHE_S": "0",  # every request looks its key up in the database
    }
    proc = start_service("gateway", env, tmp_path)  # stdout and stderr to tmp_path/gateway.log
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_ready(http_probe(f"{url}/health"), 120)
        yield url, admin_key, proc.log_path, database
    finally:
        code, _ = proc.terminate(30)
        if code is None:
            proc.kill()


def rename_table(database: Path, old: str, new: str) -> None:
    with sqlite3.connect(database) as db:
        db.execute(f"ALTER TABLE {old} RENAME TO {new}")


def test_no_key_in_any_log_line(gateway_process: tuple[str, str, Path, Path]) -> None:
    url, admin_key, log, database = gateway_process
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=15)
    tenant = admin.post("/v1/admin/tenants", json={"name": "Log Test"}).json()["id"]
    used, revoked = (admin.post(f"/v1/admin/tenants/{tenant}/keys", json={"name": n}).json() for n in ("ci", "old"))
    secrets_seen = [admin_key, used["key"], revoked["key"]]

    def call(key: str, method: str, path: str, **kwargs: object) -> int:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.request(method, f"{url}{path}", headers=headers, timeout=15, **kwargs).status_code  # type: ignore[arg-type]

    assert call(used["key"], "GET", "/v1/models") == 200
    files = {"file": ("train.jsonl", JSONL)}
    assert call(used["key"], "POST", "/v1/files", files=files, data={"purpose": "fine-tune"}) == 200
    # The default base model, with no replica up: the generation fails upstream, and that is logged too.
    chat = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}]}
    assert call(used["key"], "POST", "/v1/chat/completions", json=chat) == 503
    assert call(used["key"], "GET", "/v1/admin/tenants") == 403
    assert admin.get(f"/v1/admin/tenants/{tenant}/keys").status_code == 200
    assert admin.patch(f"/v1/admin/keys/{used['id']}", json={"rpm_limit": 1000}).status_code == 200
    assert admin.delete(f"/v1/admin/keys/{revoked['id']}").status_code == 200
    assert call(revoked["key"], "GET", "/v1/models") == 401
    wrong = "lf-" + secrets.token_urlsafe(32)
    secrets_seen.append(wrong)
    assert call(wrong, "GET", "/v1/models") == 401
    assert call(f"{used['key']}x", "GET", "/v1/files") == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Basic {used['key']}"}).status_code == 401
    assert admin.get("/metrics").status_code == 200

    # The database breaks while keys are looked up and created: its errors name the statement, not the key.
    rename_table(database, KEYS_TABLE, f"{KEYS_TABLE}_away")
    try:
        assert call(used["key"], "GET", "/v1/models") == 503
        assert admin.post(f"/v1/admin/tenants/{tenant}/keys", json={}).status_code == 503
    finally:
        rename_table(database, f"{KEYS_TABLE}_away", KEYS_TABLE)
    assert call(used["key"], "GET", "/v1/models") == 200
    admin.close()

    time.sleep(0.5)  # let the last lines reach the file
    text = log.read_text(errors="replace")
    # The log is real and complete: DEBUG lines, the key lifecycle, and the database failure were all written.
    assert " DEBUG " in text and "gateway database error" in text
    assert f"API key {used['id']} ({used['prefix']}...) created" in text and f"API key {revoked['id']} revoked" in text
    leaks = []
    for secret in secrets_seen:
        needles = {
            "key": secret,
            "secret part": secret[11:],  # past the displayed prefix (lf- + 8 characters) that listings show
            "sha256": hashlib.sha256(secret.encode()).hexdigest(),
        }
        leaks += [f"{what} of {secret[:11]}..." for what, needle in needles.items() if needle in text]
    assert leaks == [], leaks
