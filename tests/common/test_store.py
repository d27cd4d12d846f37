"""The object-store interface, against both backends: a local folder and a real S3 HTTP server (moto)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lorafleet_common.store import (
    InvalidKey,
    ObjectNotFound,
    ObjectStore,
    S3Config,
    S3Store,
    StoreUnavailable,
    open_store,
    resolve_uri,
)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "local":
        yield open_store(tmp_path.as_uri())
    else:
        cfg: S3Config = request.getfixturevalue("s3_server")
        yield open_store(f"s3://lorafleet/{tmp_path.name}", cfg)


def test_put_get_list_delete(store: ObjectStore, tmp_path: Path) -> None:
    store.put("a/b/one.txt", b"1")
    store.put("a/two.txt", b"22")
    store.put("other.txt", b"x")
    assert store.get("a/b/one.txt") == b"1"
    assert store.list("a") == ["a/b/one.txt", "a/two.txt"]
    assert store.list("a/") == ["a/b/one.txt", "a/two.txt"]
    assert store.exists("a/two.txt") and not store.exists("a/missing")
    store.put("a/two.txt", b"replaced")
    assert store.get("a/two.txt") == b"replaced"
    store.delete("a/two.txt")
    store.delete("a/two.txt")  # idempotent
    assert store.list("a") == ["a/b/one.txt"]
    with pytest.raises(ObjectNotFound):
        store.get("a/two.txt")


def test_upload_download(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"\x00" * 1000 + b"end")
    store.upload(src, "blobs/x.bin")
    dest = tmp_path / "out" / "x.bin"
    store.download("blobs/x.bin", dest)
    assert dest.read_bytes() == src.read_bytes()
    with pytest.raises(ObjectNotFound):
        store.download("blobs/none.bin", dest)


@pytest.mark.parametrize("key", ["", "/abs", "../up", "a/../../b", "a//b", "a/./b", "a\\b", ".."])
def test_keys_cannot_escape(store: ObjectStore, key: str) -> None:
    with pytest.raises(InvalidKey):
        store.put(key, b"x")


def test_uris(tmp_path: Path, s3_server: S3Config) -> None:
    default = open_store(tmp_path.as_uri())
    store, key = resolve_uri("datasets/x.jsonl", default)
    assert store is default and key == "datasets/x.jsonl"
    (tmp_path / "f.jsonl").write_text("{}")
    store, key = resolve_uri((tmp_path / "f.jsonl").as_uri(), default)
    assert store.get(key) == b"{}"
    s3, key = resolve_uri("s3://lorafleet/some/key.json", default, s3_server)
    s3.put(key, b"hello")
    assert open_store("s3://lorafleet", s3_server).get("some/key.json") == b"hello"
    for bad in ("ftp://x/y", "s3://", "s3://bucket", "file://relative"):
        with pytest.raises(InvalidKey):
            resolve_uri(bad, default)


def test_unreachable_s3_is_unavailable_not_missing() -> None:
    from tests.conftest import free_port

    store = open_store("s3://lorafleet", S3Config(endpoint=f"127.0.0.1:{free_port()}", timeout_s=1))
    with pytest.raises(StoreUnavailable):
        store.get("x")


def test_a_full_local_disk_is_not_an_unreachable_store(store: ObjectStore, tmp_path: Path) -> None:
    """ENOSPC while a download writes is raised as is (the inference cache evicts and retries on it); it used to
    be reported as "object store unreachable" by S3Store. The disk is /dev/full: a real ENOSPC from the kernel."""
    import errno

    store.put("blobs/x.bin", b"x" * 10_000)
    dest = tmp_path / "cache" / "x.bin"
    dest.parent.mkdir()
    if isinstance(store, S3Store):
        # minio writes to "<dest>.<etag>.part.minio" first, then renames it to dest.
        etag = store.client.stat_object(store.bucket, store._key("blobs/x.bin")).etag
        Path(f"{dest}.{etag}.part.minio").symlink_to("/dev/full")
    else:
        dest.symlink_to("/dev/full")
    with pytest.raises(OSError) as full:
        store.download("blobs/x.bin", dest)
    assert full.value.errno == errno.ENOSPC and not isinstance(full.value, StoreUnavailable)
