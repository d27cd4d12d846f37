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
    """The key is empty, absolute or escapes the store's root."""


def normalize_key(key: str) -> str:
    """Return a canonical relative key, refusing absolute paths and '..'."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise InvalidKey(f"invalid object key {key!r}")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", ".."):
        raise InvalidKey(f"invalid object key {key!r}")
    return posixpath.normpath(key)


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
        """Keys under prefix (recursive), sorted."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; no error if missing."""
        ...

    def uri(self, key: str) -> str:
        """A URI naming the object (file://… or s3://…)."""
        ...
