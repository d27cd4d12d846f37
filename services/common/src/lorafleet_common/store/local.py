"""Object store on a local directory: the embedded default."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from lorafleet_common.store.base import InvalidKey, ObjectNotFound, normalize_key, normalize_prefix


class LocalStore:
    """Objects are files under ``root``; writes are atomic renames."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / normalize_key(key)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(self.uri(key)) from exc

    def _writable(self, key: str) -> Path:
        """The key's path with its folders made; InvalidKey where a folder and a file would share a name."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:  # "a" is a file and the key is "a/b"
            raise InvalidKey(f"object key {key!r} runs through an existing object in {self.root}") from exc
        if path.is_dir():  # the key is "a" and "a/b" exists: S3 allows both, a folder cannot
            raise InvalidKey(f"object key {key!r} is a folder of other objects in {self.root}")
        return path

    def put(self, key: str, data: bytes) -> None:
        path = self._writable(key)
        # Write beside the target and rename: readers never see half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def download(self, key: str, dest: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFound(self.uri(key))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)

    def upload(self, src: Path, key: str) -> None:
        path = self._writable(key)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        # Normalized like a key: "/" or "../x" would otherwise walk (and name) files outside the root.
        folder = normalize_prefix(prefix)
        base = self.root / folder if folder else self.root
        if not base.is_dir():
            return []
        keys = [
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        ]
        return sorted(keys)

    def delete(self, key: str) -> None:
        # A folder of other objects ("a" when "a/b" exists), or a path through a file, is no object: nothing to do.
        with contextlib.suppress(IsADirectoryError, NotADirectoryError):
            self._path(key).unlink(missing_ok=True)

    def uri(self, key: str) -> str:
        return (self.root / key).as_uri()
