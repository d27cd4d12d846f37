"""Object store on S3 or MinIO through the minio SDK."""

from __future__ import annotations

import errno
import io
from pathlib import Path

import urllib3
from minio import Minio
from minio.error import S3Error

from lorafleet_common.store.base import ObjectNotFound, StoreUnavailable, normalize_key, normalize_prefix

_MISSING = {"NoSuchKey", "NoSuchObject", "NoSuchBucket"}
# Errors of the local disk a download writes to: the caller's problem to handle (e.g. evict and retry), not
# an unreachable store. (Network errors are OSErrors too: ConnectionError, TimeoutError, urllib3's.)
_LOCAL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def make_client(
    endpoint: str, access_key: str, secret_key: str, *, secure: bool, region: str | None, timeout_s: float
) -> Minio:
    """A minio client whose every call is bounded by ``timeout_s``."""
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=min(timeout_s, 5.0), read=timeout_s),
        retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        maxsize=16,
    )
    return Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region, http_client=http)


class S3Store:
    """Objects under ``prefix`` in one bucket."""

    def __init__(self, client: Minio, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def _key(self, key: str) -> str:
        key = normalize_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _unprefix(self, name: str) -> str:
        return name[len(self.prefix) + 1 :] if self.prefix else name

    def get(self, key: str) -> bytes:
        try:
            resp = self.client.get_object(self.bucket, self._key(key))
        except S3Error as exc:
            raise self._error(exc, key) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StoreUnavailable(f"object store unreachable reading {self.uri(key)}: {exc}") from exc
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(self.bucket, self._key(key), io.BytesIO(data), len(data))
        except S3Error as exc:
            raise self._error(exc, key) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StoreUnavailable(f"object store unreachable writing {self.uri(key)}: {exc}") from exc

    def download(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.fget_object(self.bucket, self._key(key), str(dest))
        except S3Error as exc:
            raise self._error(exc, key) from exc
        except OSError as exc:
            if exc.errno in _LOCAL_DISK_ERRNOS:
                raise  # the local disk is full or read-only: the store is fine
            raise StoreUnavailable(f"object store unreachable reading {self.uri(key)}: {exc}") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise StoreUnavailable(f"object store unreachable reading {self.uri(key)}: {exc}") from exc

    def upload(self, src: Path, key: str) -> None:
        try:
            self.client.fput_object(self.bucket, self._key(key), str(src))
        except S3Error as exc:
            raise self._error(exc, key) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StoreUnavailable(f"object store unreachable writing {self.uri(key)}: {exc}") from exc

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, self._key(key))
            return True
        except S3Error as exc:
            if exc.code in _MISSING or exc.code == "NoSuchKey":
                return False
            raise self._error(exc, key) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StoreUnavailable(f"object store unreachable: {exc}") from exc

    def list(self, prefix: str) -> list[str]:
        # S3 prefixes are plain string prefixes: end the folder with '/' so "files/t1" never lists "files/t10/...".
        folder = "/".join(part for part in (self.prefix, normalize_prefix(prefix)) if part)
        try:
            objs = self.client.list_objects(self.bucket, prefix=f"{folder}/" if folder else None, recursive=True)
            return sorted(self._unprefix(o.object_name) for o in objs if o.object_name)
        except S3Error as exc:
            if exc.code == "NoSuchBucket":
                raise StoreUnavailable(f"bucket {self.bucket!r} does not exist") from exc
            raise self._error(exc, prefix) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StoreUnavailable(f"object store unreachable: {exc}") from exc

    def delete(self, key: str) -> None:
        try:
            self.client.remove_object(self.bucket, self._key(key))
        except S3Error as exc:
            if exc.code not in _MISSING:
                raise self._error(exc, key) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StoreUnavailable(f"object store unreachable: {exc}") from exc

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _error(self, exc: S3Error, key: str) -> Exception:
        if exc.code in _MISSING:
            return ObjectNotFound(self.uri(key))
        return StoreUnavailable(f"object store error on {self.uri(key)}: {exc.code}: {exc.message}")
