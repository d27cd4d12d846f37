"""No key or list prefix leaves the store's root, whatever it holds (hypothesis), on both backends.

LocalStore is checked on the disk: every write lands under its root, and nothing outside it (a
sibling folder holding a "secret") can be read, listed or deleted through any key. S3Store is
checked against a real S3 HTTP server (moto): every object written lands under the store's
prefix in the bucket. Examples are derandomized and bounded; deadlines are off (shared machine).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafleet_common.store import (
    InvalidKey,
    LocalStore,
    ObjectNotFound,
    ObjectStore,
    S3Config,
    S3Store,
    make_client,
    open_store,
)

FUZZ = settings(
    max_examples=200,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)
SECRET = b"the other tenant's data"

# Pieces of keys that have escaped a folder somewhere: traversal, encodings a layer might decode,
# separators of other systems, NUL, lookalikes, absolute paths and URLs.
TRICKS = [
    "..",
    ".",
    "",
    "/",
    "\\",
    "..\\",
    "%2e%2e",
    "%2e%2e%2f",
    "..%2f",
    "%252e%252e%252f",
    "..%c0%af",
    "\x00",
    "\u2024\u2024",  # one-dot leaders
    "\uff0e\uff0e",  # fullwidth full stops
    "\u2215",  # division slash
    "\u202e",  # right-to-left override
    "~",
    "/etc/passwd",
    "file:///etc/passwd",
    "s3://other-bucket/key",
    "outside/secret.txt",
    "x" * 300,  # over a file name's 255 bytes
    "\ud800",  # a lone surrogate: no file or S3 name can hold it
]
segments = st.sampled_from(TRICKS) | st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/"), min_size=1, max_size=12
)
keys = st.lists(segments, min_size=1, max_size=6).map("/".join) | st.sampled_from(TRICKS)
prefixes = keys | st.sampled_from(["", "/", "//", "../", "../outside", "a/../../outside/"])


@pytest.fixture
def local(tmp_path: Path) -> Iterator[tuple[LocalStore, Path]]:
    """A store in root/ beside outside/secret.txt, which no key may reach."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_bytes(SECRET)
    yield LocalStore(tmp_path / "root"), tmp_path


def _files(folder: Path) -> set[Path]:
    return {Path(dirpath) / name for dirpath, _, names in os.walk(folder) for name in names}


@FUZZ
@given(key=keys)
def test_local_keys_stay_under_the_root(local: tuple[LocalStore, Path], key: str) -> None:
    store, top = local
    before = _files(top)
    try:
        store.put(key, b"fuzz")
    except InvalidKey:
        assert _files(top) == before
    else:
        written = _files(top) - before
        assert all(path.resolve().is_relative_to(store.root) for path in written), written
        assert store.get(key) == b"fuzz"
        store.delete(key)
    for action in (store.get, store.exists, store.delete):
        with contextlib.suppress(InvalidKey, ObjectNotFound):
            assert action(key) != SECRET
    # Nothing outside the root was read, overwritten or removed.
    assert (top / "outside" / "secret.txt").read_bytes() == SECRET


@FUZZ
@given(prefix=prefixes)
def test_local_list_never_names_or_walks_files_outside(local: tuple[LocalStore, Path], prefix: str) -> None:
    store, _ = local
    store.put("inside/one.txt", b"1")
    try:
        listed = store.list(prefix)
    except InvalidKey:
        return
    for key in listed:
        assert (store.root / key).resolve().is_relative_to(store.root), key
        assert store.get(key) != SECRET


@pytest.mark.parametrize("prefix", ["/", "//", "../", "../outside", "a/../../outside/", "/etc", "x" * 300])
def test_local_list_refuses_prefixes_that_escape(local: tuple[LocalStore, Path], prefix: str) -> None:
    """Regressions: "/" listed (walked) the whole filesystem, "../outside" listed the secret as
    "../outside/secret.txt", an over-long name raised a bare OSError."""
    store, _ = local
    with pytest.raises(InvalidKey):
        store.list(prefix)


@pytest.mark.parametrize("key", ["x" * 256, "a/" * 600 + "b", "\ud800", "ok/\udcff.json"])
def test_keys_no_backend_can_hold_are_invalid(local: tuple[LocalStore, Path], key: str) -> None:
    """Regressions: these raised OSError (name too long) or UnicodeEncodeError instead of InvalidKey."""
    store, _ = local
    for action in (lambda: store.put(key, b"x"), lambda: store.get(key), lambda: store.exists(key)):
        with pytest.raises(InvalidKey):
            action()


def test_list_is_a_folder_not_a_string_prefix(tmp_path: Path, s3_server: S3Config) -> None:
    """Regression: on S3, list("files/t1/") also listed tenant t10's files (normalizing dropped the '/')."""
    stores: list[ObjectStore] = [
        open_store(tmp_path.as_uri()),
        open_store(f"s3://lorafleet/{tmp_path.name}-folder", s3_server),
    ]
    for store in stores:
        store.put("files/t1/a.json", b"1")
        store.put("files/t10/b.json", b"2")
        store.put("files/t1.json", b"3")
        for prefix in ("files/t1/", "files/t1"):
            assert store.list(prefix) == ["files/t1/a.json"], (store, prefix)
        assert store.list("") == ["files/t1.json", "files/t1/a.json", "files/t10/b.json"]


@pytest.fixture(scope="module")
def s3_bucket_view(s3_server: S3Config) -> Iterator[tuple[S3Store, S3Store]]:
    """A store under a prefix of the shared bucket, and a view of the whole bucket to see where objects land."""
    client = make_client(
        s3_server.endpoint, s3_server.access_key, s3_server.secret_key, secure=False, region=None, timeout_s=10
    )
    yield S3Store(client, "lorafleet", "keys-fuzz/root"), S3Store(client, "lorafleet")


@settings(FUZZ, max_examples=60)  # each example is a few HTTP round trips to moto
@given(key=keys)
def test_s3_keys_stay_under_the_prefix(s3_bucket_view: tuple[S3Store, S3Store], key: str) -> None:
    store, bucket = s3_bucket_view
    bucket.put("keys-fuzz/outside/secret.txt", SECRET)
    try:
        store.put(key, b"fuzz")
    except InvalidKey:
        return
    landed = [k for k in bucket.list("") if k.startswith("keys-fuzz/") and k != "keys-fuzz/outside/secret.txt"]
    assert landed and all(k.startswith("keys-fuzz/root/") for k in landed), landed
    assert store.get(key) == b"fuzz"
    assert all(not k.startswith("../") for k in store.list(""))
    store.delete(key)
    assert bucket.get("keys-fuzz/outside/secret.txt") == SECRET


def test_a_key_and_a_folder_of_the_same_name_are_invalid_locally(local: tuple[LocalStore, Path]) -> None:
    """Regression (found by the fuzzer): "a" after "a/b", or "f/g" after "f", raised IsADirectoryError or
    NotADirectoryError out of put; S3 allows both, a local folder cannot, so the local store says InvalidKey."""
    store, _ = local
    store.put("a/b", b"1")
    store.put("f", b"2")
    for key in ("a", "f/g"):
        with pytest.raises(InvalidKey):
            store.put(key, b"x")
        store.delete(key)  # no such object: nothing to do, no error
    assert (store.get("a/b"), store.get("f")) == (b"1", b"2")
