"""Names that reach object-store keys and file paths: validated in one place.

An adapter reference is ``name`` or ``name@version``. Names are one or more
'/'-separated segments (a tenant namespace may come first); each segment
starts with a letter or digit and holds letters, digits, '.', '_', '-' or ':'.
Nothing in a name can climb out of a folder: no '..', no absolute paths, no
backslashes, bounded length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_NAME_LENGTH = 200
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class InvalidName(ValueError):
    """A name or version that may not be used."""


@dataclass(frozen=True)
class AdapterRef:
    """A parsed adapter reference."""

    name: str
    version: str | None = None

    def __str__(self) -> str:
        return f"{self.name}@{self.version}" if self.version else self.name


def validate_adapter_name(name: str) -> str:
    """Return name if it is a valid adapter name, else raise InvalidName."""
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"adapter name must be 1-{MAX_NAME_LENGTH} characters")
    for segment in name.split("/"):
        if not _SEGMENT.match(segment) or ".." in segment:
            raise InvalidName(
                f"invalid adapter name {name!r}: each '/'-separated part must start with a letter or digit "
                "and contain only letters, digits, '.', '_', '-' or ':'"
            )
    return name


def validate_version(version: str) -> str:
    """Return version if valid, else raise InvalidName."""
    if not _VERSION.match(version) or ".." in version:
        raise InvalidName(f"invalid adapter version {version!r}")
    return version


def parse_adapter_ref(ref: str) -> AdapterRef:
    """Parse ``name`` or ``name@version``."""
    name, sep, version = ref.partition("@")
    validate_adapter_name(name)
    if sep:
        return AdapterRef(name, validate_version(version))
    return AdapterRef(name)


def validate_job_id(job_id: str) -> str:
    """Return job_id if valid, else raise InvalidName."""
    if not _JOB_ID.match(job_id):
        raise InvalidName(f"invalid job id {job_id!r}: letters, digits, '-' and '_' only, at most 64")
    return job_id
