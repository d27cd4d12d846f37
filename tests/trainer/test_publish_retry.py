"""Publishing outlasts an unreachable store for a bounded time (the end-to-end run with a stopped S3 server
is tests/e2e/test_faults_training.py); here the clock and the sleeps are the test's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lorafleet_common.adapters import latest_key, read_metadata
from lorafleet_common.store import InvalidKey, LocalStore, StoreUnavailable
from lorafleet_trainer.publish import PublishFailed, publish_with_retry
from tests.inference.inference_helpers import metadata_for, write_adapter_dir


class OutageStore(LocalStore):
    """A LocalStore whose writes fail while ``down`` (an S3 server that stopped answering)."""

    def __init__(self, root: Path, error: Exception | None = None) -> None:
        super().__init__(root)
        self.down = True
        self.error = error or StoreUnavailable("object store unreachable: connection refused")
        self.attempts = 0

    def upload(self, src: Path, key: str) -> None:
        self.attempts += 1
        if self.down:
            raise self.error
        super().upload(src, key)


class FakeTime:
    def __init__(self, store: OutageStore | None = None, up_at: float | None = None) -> None:
        self.now = 0.0
        self.slept: list[float] = []
        self.store, self.up_at = store, up_at

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        if self.store is not None and self.up_at is not None and self.now >= self.up_at:
            self.store.down = False


def publish(store: OutageStore, tmp_path: Path, clock: FakeTime, warnings: list[str], **kwargs: Any) -> str:
    folder = write_adapter_dir(tmp_path / "adapter")
    return publish_with_retry(
        store,
        folder,
        metadata_for(folder, "t/retried", "job-1"),
        warnings.append,
        sleep=clock.sleep,
        clock=lambda: clock.now,
        **kwargs,
    )


def test_publishing_waits_for_the_store_with_backoff_then_publishes_everything(tmp_path: Path) -> None:
    store = OutageStore(tmp_path / "store")
    clock = FakeTime(store, up_at=100)
    warnings: list[str] = []
    uri = publish(store, tmp_path, clock, warnings)
    assert clock.slept == [1, 2, 4, 8, 16, 30, 30, 30]  # doubling, capped at 30 s, until the store is back at 100 s
    assert len(warnings) == 8 and all(w.startswith("warning: publishing failed (attempt") for w in warnings)
    assert "connection refused" in warnings[0]
    assert store.get(latest_key("t/retried")) == b"job-1" and uri.endswith("t/retried/versions/job-1")
    assert read_metadata(store, "t/retried", "job-1").version == "job-1"


def test_a_store_that_stays_down_fails_the_job_with_the_reason_in_bounded_time(tmp_path: Path) -> None:
    store = OutageStore(tmp_path / "store")
    clock = FakeTime()
    with pytest.raises(PublishFailed) as failed:
        publish(store, tmp_path, clock, [], give_up_after_s=120)
    assert clock.now == 120  # the last wait is cut to the deadline
    message = str(failed.value)
    assert "t/retried@job-1 could not be published" in message and "unreachable for 120 s" in message
    assert "connection refused" in message
    assert not store.exists(latest_key("t/retried"))


def test_errors_that_waiting_cannot_fix_are_not_retried(tmp_path: Path) -> None:
    store = OutageStore(tmp_path / "store", error=InvalidKey("object key too long"))
    clock = FakeTime()
    with pytest.raises(InvalidKey):
        publish(store, tmp_path, clock, [])
    assert store.attempts == 1 and clock.slept == []
