"""API-key authentication as a dependency that returns the calling Principal.

Today the only key is the admin key. Tenants slot in by teaching
``Authenticator`` to map their keys to Principals that carry a tenant id;
routes already receive the Principal, never the key.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from pydantic import SecretStr

from lorafleet_gateway.errors import AuthenticationFailed


@dataclass(frozen=True)
class Principal:
    """Who is calling."""

    subject: str
    is_admin: bool = False


def _digest(key: str) -> bytes:
    # Comparing fixed-length digests keeps compare_digest constant-time in the key's length too.
    return hashlib.sha256(key.encode()).digest()


class Authenticator:
    """Checks ``Authorization: Bearer <key>``. Keys are never logged or echoed."""

    def __init__(self, admin_key: SecretStr) -> None:
        self._admin_digest = _digest(admin_key.get_secret_value())

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it in the Authorization header as 'Bearer <key>'."
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationFailed("Malformed Authorization header: expected 'Bearer <key>'.")
        if hmac.compare_digest(_digest(token), self._admin_digest):
            return Principal(subject="admin", is_admin=True)
        raise AuthenticationFailed("Incorrect API key provided.")


def get_principal(request: Request) -> Principal:
    """FastAPI dependency: the authenticated caller, or 401."""
    authenticator: Authenticator = request.app.state.authenticator
    principal = authenticator.authenticate(request.headers.get("authorization"))
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
