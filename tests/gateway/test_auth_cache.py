"""The authenticator's key cache under concurrency: one database query per key at a time, a key in use refreshed
in the background before it expires, and revocations that a query already running cannot undo.

A real TenantDirectory on SQLite; ``GatedDirectory`` counts its ``find_key`` calls and can hold them open, so a
test decides when a query answers."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from lorafleet_gateway.auth import Authenticator
from lorafleet_gateway.db.database import migrate, open_engine
from lorafleet_gateway.errors import AuthenticationFailed
from lorafleet_gateway.tenancy.directory import TenantDirectory


class GatedDirectory:
    """``find_key`` of a real directory, counted, and held until ``gate`` is set (it starts set)."""

    def __init__(self, directory: TenantDirectory) -> None:
        self.directory = directory
        self.calls = 0
        self.gate = threading.Event()
        self.gate.set()
        # released once per call that reaches the gate closed (one let through an open gate would leave a
        # release behind, and the next ``entered`` would return before the call it waits for had begun)
        self.entered = threading.Semaphore(0)

    def find_key(self, secret: str) -> Any:
        self.calls += 1
        if not self.gate.is_set():
            self.entered.release()
        assert self.gate.wait(10), "the test never opened the gate"
        return self.directory.find_key(secret)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[TenantDirectory, GatedDirectory, str, str]:
    engine = open_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
    migrate(engine)
    directory = TenantDirectory(engine)
    directory.create_tenant("acme", "Acme", None, None)
    key, secret = directory.create_key("acme", "k", None, None)
    return directory, GatedDirectory(directory), key.id, secret


def authenticator(gated: GatedDirectory, cache_s: float) -> Authenticator:
    return Authenticator(SecretStr("admin-key-0123456789"), gated, cache_s=cache_s)  # type: ignore[arg-type]


async def entered(gated: GatedDirectory) -> None:
    """Until a query reached the gate (waited for in a thread: the query runs in one too)."""
    assert await asyncio.to_thread(gated.entered.acquire, True, 10)


async def test_requests_that_miss_together_share_one_query(
    keys: tuple[TenantDirectory, GatedDirectory, str, str],
) -> None:
    _, gated, key_id, secret = keys
    auth = authenticator(gated, cache_s=5.0)
    gated.gate.clear()
    requests = [asyncio.create_task(auth.authenticate(f"Bearer {secret}")) for _ in range(16)]
    await entered(gated)
    await asyncio.sleep(0.05)  # every request is waiting now
    gated.gate.set()
    principals = await asyncio.gather(*requests)
    assert {p.subject for p in principals} == {key_id}
    assert gated.calls == 1
    await auth.authenticate(f"Bearer {secret}")  # cached
    assert gated.calls == 1
    await auth.close()


async def test_a_request_that_goes_away_leaves_the_query_to_the_others(
    keys: tuple[TenantDirectory, GatedDirectory, str, str],
) -> None:
    _, gated, key_id, secret = keys
    auth = authenticator(gated, cache_s=5.0)
    gated.gate.clear()
    first = asyncio.create_task(auth.authenticate(f"Bearer {secret}"))
    second = asyncio.create_task(auth.authenticate(f"Bearer {secret}"))
    await entered(gated)
    first.cancel()
    gated.gate.set()
    assert (await second).subject == key_id
    with pytest.raises(asyncio.CancelledError):
        await first
    assert gated.calls == 1
    await auth.close()


async def test_a_key_in_use_is_refreshed_in_the_background_before_it_expires(
    keys: tuple[TenantDirectory, GatedDirectory, str, str],
) -> None:
    _, gated, key_id, secret = keys
    auth = authenticator(gated, cache_s=2.0)
    began = time.monotonic()
    await auth.authenticate(f"Bearer {secret}")  # the entry lives until ~2.0 s

    async def until(t: float) -> None:
        await asyncio.sleep(max(0.0, began + t - time.monotonic()))

    await until(1.5)  # past half its life
    gated.gate.clear()
    assert (await auth.authenticate(f"Bearer {secret}")).subject == key_id  # the cached entry, at once ...
    await entered(gated)  # ... while the refresh runs (held at the gate)
    await auth.authenticate(f"Bearer {secret}")  # one refresh at a time
    gated.gate.set()
    assert gated.calls == 2
    await until(2.2)  # the first entry expired; the refreshed one (~3.5 s) is not past half its life
    await auth.authenticate(f"Bearer {secret}")
    assert gated.calls == 2 and time.monotonic() - began < 2.5, "the machine was too slow for this test's timing"
    await auth.close()


async def test_an_entry_is_never_used_past_its_life_even_while_a_refresh_runs(
    keys: tuple[TenantDirectory, GatedDirectory, str, str],
) -> None:
    """A revocation through another gateway (the database changed, not this process) applies within cache_s."""
    directory, gated, key_id, secret = keys
    auth = authenticator(gated, cache_s=0.4)
    await auth.authenticate(f"Bearer {secret}")
    directory.revoke_key(key_id)
    await asyncio.sleep(0.45)
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate(f"Bearer {secret}")
    await auth.close()


async def test_a_revocation_here_wins_over_a_query_that_read_the_key_before_it(
    keys: tuple[TenantDirectory, GatedDirectory, str, str],
) -> None:
    directory, gated, key_id, secret = keys
    auth = authenticator(gated, cache_s=5.0)
    gated.gate.clear()
    early = asyncio.create_task(auth.authenticate(f"Bearer {secret}"))
    await entered(gated)
    answer = await asyncio.to_thread(directory.find_key, secret)  # what the held query will read: still valid
    assert answer is not None and answer.key.revoked_at is None
    directory.revoke_key(key_id)  # as the admin API does, then it tells this gateway
    auth.forget(key_id=key_id)
    gated.directory = _Frozen(answer)  # the held query returns what it read before the revocation
    gated.gate.set()
    assert (await early).subject == key_id  # it was in flight before the revocation
    gated.directory = directory
    with pytest.raises(AuthenticationFailed):  # ... but its answer was not cached
        await auth.authenticate(f"Bearer {secret}")
    await auth.close()


class _Frozen:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def find_key(self, secret: str) -> Any:
        return self.answer


async def test_without_a_cache_every_request_asks_the_database(
    keys: tuple[TenantDirectory, GatedDirectory, str, str],
) -> None:
    _, gated, _, secret = keys
    auth = authenticator(gated, cache_s=0)
    await asyncio.gather(*(auth.authenticate(f"Bearer {secret}") for _ in range(3)))
    assert gated.calls == 3
    await auth.close()


async def test_close_stops_a_background_refresh(keys: tuple[TenantDirectory, GatedDirectory, str, str]) -> None:
    _, gated, _, secret = keys
    auth = authenticator(gated, cache_s=1.0)
    await auth.authenticate(f"Bearer {secret}")
    await asyncio.sleep(0.6)  # past half its life
    gated.gate.clear()
    await auth.authenticate(f"Bearer {secret}")  # starts the refresh, held at the gate
    await entered(gated)
    closing = asyncio.create_task(auth.close())
    await asyncio.sleep(0.05)
    gated.gate.set()  # the thread finishes its query; the task was cancelled already
    await closing
    assert not auth._running
