"""The object-store interface every service talks to.

Keys are '/'-separated relative paths. Implementations are synchronous (the
minio SDK is); async callers wrap calls in ``asyncio.to_thread``.
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Protocol


class StoreError(Exception):
    """Base class of object-store failures."""


class ObjectNotFound(StoreError):
    """The key does not exist."""


class StoreUnavailable(StoreError):
    """The store could not be reached or answered with an unexpected error."""


class InvalidKey(StoreError):
    """The key is empty, absolute, escapes the store's root, or is longer than a store can hold."""


# S3 keys are at most 1024 UTF-8 bytes; file names at most 255 on the usual filesystems. Refusing
# longer keys here gives both backends the same InvalidKey, not an S3 error on one and OSError on the other.
MAX_KEY_BYTES = 1024
MAX_SEGMENT_BYTES = 255


def _shown(key: str) -> str:
    return repr(key) if len(key) <= 80 else f"{key[:80]!r}... ({len(key)} characters)"


def normalize_key(key: str) -> str:
    """Return a canonical relative key, refusing absolute paths, '..' and over-long names."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise InvalidKey(f"invalid object key {_shown(key)}")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError as exc:  # a lone surrogate: no file or S3 name can hold it
        raise InvalidKey(f"invalid object key {_shown(key)}: not valid Unicode") from exc
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", ".."):
        raise InvalidKey(f"invalid object key {_shown(key)}")
    if size > MAX_KEY_BYTES or any(len(p.encode("utf-8")) > MAX_SEGMENT_BYTES for p in parts):
        raise InvalidKey(
            f"object key {_shown(key)} is too long: at most {MAX_KEY_BYTES} bytes, {MAX_SEGMENT_BYTES} per '/' part"
        )
    return posixpath.normpath(key)


def normalize_prefix(prefix: str) -> str:
    """A list() prefix as a folder key ("" for the whole store); the same rules as keys, trailing '/' optional."""
    folder = prefix.rstrip("/")
    if not folder:
        if prefix:  # "/" alone is an absolute path, not "everything"
            raise InvalidKey(f"invalid object prefix {prefix!r}")
        return ""
    return normalize_key(folder)


class ObjectStore(Protocol):
    """A flat key → bytes store (a local folder, S3, MinIO)."""

    def get(self, key: str) -> bytes:
        """Return the object's bytes; ObjectNotFound if missing."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Write the object, replacing any previous one atomically."""
        ...

    def download(self, key: str, dest: Path) -> None:
        """Copy the object to a local file; ObjectNotFound if missing."""
        ...

    def upload(self, src: Path, key: str) -> None:
        """Copy a local file to the object."""
        ...

    def exists(self, key: str) -> bool:
        """Whether the object exists."""
        ...

    def list(self, prefix: str) -> list[str]:
        """Keys inside the folder ``prefix`` (recursive; "a" and "a/" list a/..., never "ab/..."), sorted."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; no error if missing."""
        ...

    def uri(self, key: str) -> str:
        """A URI naming the object (file://… or s3://…)."""
        ...
