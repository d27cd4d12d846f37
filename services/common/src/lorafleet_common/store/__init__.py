"""One object-store interface; a local-directory backend and an S3/MinIO backend.

URIs: ``file:///abs/path`` (local) and ``s3://bucket/key`` (S3/MinIO). A bare
key is relative to the service's configured store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from lorafleet_common.store.base import (
    InvalidKey,
    ObjectNotFound,
    ObjectStore,
    StoreError,
    StoreUnavailable,
    normalize_key,
    normalize_prefix,
)
from lorafleet_common.store.local import LocalStore
from lorafleet_common.store.s3 import S3Store, make_client

__all__ = [
    "InvalidKey",
    "LocalStore",
    "ObjectNotFound",
    "ObjectStore",
    "S3Config",
    "S3Store",
    "StoreError",
    "StoreUnavailable",
    "normalize_key",
    "normalize_prefix",
    "open_store",
    "resolve_uri",
]


@dataclass(frozen=True)
class S3Config:
    """How to reach an S3-compatible endpoint (MinIO, AWS)."""

    endpoint: str = "localhost:9000"
    access_key: str = ""
    secret_key: str = ""
    secure: bool = False
    region: str | None = None
    timeout_s: float = 30.0


def open_store(url: str, s3: S3Config | None = None) -> ObjectStore:
    """Open the store a URL names: ``file:///dir`` or ``s3://bucket[/prefix]``."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStore(Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise InvalidKey(f"store URL {url!r} names no bucket")
        cfg = s3 or S3Config()
        client = make_client(
            cfg.endpoint,
            cfg.access_key,
            cfg.secret_key,
            secure=cfg.secure,
            region=cfg.region,
            timeout_s=cfg.timeout_s,
        )
        return S3Store(client, parsed.netloc, parsed.path.strip("/"))
    if not parsed.scheme and url.startswith("/"):
        return LocalStore(Path(url))
    raise InvalidKey(f"unsupported store URL {url!r} (use file:///path or s3://bucket)")


def resolve_uri(uri: str, default: ObjectStore, s3: S3Config | None = None) -> tuple[ObjectStore, str]:
    """Split an object URI into (store, key).

    ``s3://bucket/key`` and ``file:///path/to/obj`` name their own store; a bare
    relative key lives in ``default``.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        key = parsed.path.lstrip("/")
        if not parsed.netloc or not key:
            raise InvalidKey(f"object URI {uri!r} must be s3://bucket/key")
        return open_store(f"s3://{parsed.netloc}", s3), normalize_key(key)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
        if not path.is_absolute():
            raise InvalidKey(f"object URI {uri!r} must be an absolute file:// path")
        return LocalStore(path.parent), normalize_key(path.name)
    if parsed.scheme:
        raise InvalidKey(f"unsupported object URI scheme in {uri!r} (use s3:// or file://)")
    return default, normalize_key(uri)
