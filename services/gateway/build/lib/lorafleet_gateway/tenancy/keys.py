"""API key material: how keys look, how they are stored, how tenant ids look.

Keys are stored as their sha256, not with a slow password hash (scrypt,
bcrypt). Slow hashes exist to make guessing *low-entropy* passwords
expensive; our keys are 256 random bits that nobody chooses, so a preimage
search is hopeless either way, while a fast deterministic hash lets every
request find its key with one indexed lookup instead of a 50-100 ms KDF. A
leaked database therefore yields no usable key. (Timing of the indexed
lookup reveals nothing useful: it compares hashes, not keys.)
"""

from __future__ import annotations

import hashlib
import re
import secrets

KEY_PREFIX = "lf-"
DISPLAY_CHARS = 11  # "lf-" + 8 random characters: enough to tell keys apart in a listing
DEFAULT_TENANT = "default"
# Tenant ids become object-store path segments and parts of model names: lowercase slugs only.
TENANT_ID = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")


def new_secret() -> str:
    """A new API key: 'lf-' and 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return f"key_{secrets.token_hex(8)}"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def display_prefix(secret: str) -> str:
    return secret[:DISPLAY_CHARS]


def slugify(name: str) -> str:
    """A tenant id derived from a display name ("Acme Corp." -> "acme-corp")."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:40].strip("-")
