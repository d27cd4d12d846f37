"""API-key authentication as a dependency that returns the calling Principal.

Two kinds of keys: the admin key (LORAFLEET_ADMIN_KEY, from settings; it
manages tenants and, on the data plane, acts as the built-in "default"
tenant), and tenant keys (``lf-...``, created through the admin API, stored
hashed). Routes receive the Principal, never the key; keys are never logged
or echoed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import SecretStr

from lorafleet_gateway.errors import AuthenticationFailed, PermissionDenied, ServiceUnavailable
from lorafleet_gateway.tenancy.directory import KeyOwner, TenantDirectory
from lorafleet_gateway.tenancy.keys import DEFAULT_TENANT, KEY_PREFIX

ADMIN_SUBJECT = "admin"
_MAX_CACHED_KEYS = 10_000


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant's key, or the admin key acting as the default tenant.

    ``rpm_limit``/``tpm_limit`` are the effective limits (key, else tenant, else
    the gateway's default); None means unlimited.
    """

    subject: str  # the key id ("key_..."), or "admin"
    tenant: str = DEFAULT_TENANT
    is_admin: bool = False
    rpm_limit: int | None = None
    tpm_limit: int | None = None


@dataclass(frozen=True)
class DefaultLimits:
    rpm: int | None = None
    tpm: int | None = None


def _digest(key: str) -> bytes:
    # Comparing fixed-length digests keeps compare_digest constant-time in the key's length too.
    return hashlib.sha256(key.encode()).digest()


def _first(*limits: int | None) -> int | None:
    return next((limit for limit in limits if limit is not None), None)


def principal_for(owner: KeyOwner, defaults: DefaultLimits) -> Principal:
    key, tenant = owner.key, owner.tenant
    return Principal(
        subject=key.id,
        tenant=tenant.id,
        rpm_limit=_first(key.rpm_limit, tenant.rpm_limit, defaults.rpm),
        tpm_limit=_first(key.tpm_limit, tenant.tpm_limit, defaults.tpm),
    )


class Authenticator:
    """Checks ``Authorization: Bearer <key>`` against the admin key, then the tenant directory.

    Verified tenant keys are cached for ``cache_s`` so a request costs no database round trip. Two things keep
    the database off the request path under load, where it used to sit once per ``cache_s`` for every request
    in flight on a key (each one a query in a worker thread, all competing with the event loop for the GIL):

    * one lookup per key at a time: requests that miss together wait for the same query;
    * a key in use is looked up again in the background once its entry is past half its life, so it never
      expires under steady traffic. An entry is still never used past ``cache_s`` after the query that made it,
      so a revocation through another gateway applies within ``cache_s``, as before.

    ``forget`` drops entries when this gateway revokes a key or disables a tenant, so those take effect at once
    here: a lookup that was running then does not cache what it read.
    """

    def __init__(
        self,
        admin_key: SecretStr,
        directory: TenantDirectory | None = None,
        *,
        defaults: DefaultLimits | None = None,
        cache_s: float = 5.0,
    ) -> None:
        self._admin_digest = _digest(admin_key.get_secret_value())
        self._directory = directory
        self._defaults = defaults or DefaultLimits()
        self._cache_s = cache_s
        self._cache: dict[bytes, tuple[Principal, float]] = {}  # digest -> (principal, expires at)
        self._lookups: dict[bytes, asyncio.Task[Principal | None]] = {}  # digest -> the query to join for it
        self._running: set[asyncio.Task[Principal | None]] = set()  # every query running, joined or not
        self._generation = 0  # bumped by forget(): a lookup started before it caches nothing

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it in the Authorization header as 'Bearer <key>'."
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationFailed("Malformed Authorization header: expected 'Bearer <key>'.")
        digest = _digest(token)
        if hmac.compare_digest(digest, self._admin_digest):
            return Principal(subject=ADMIN_SUBJECT, is_admin=True)
        principal = await self._tenant_principal(token, digest)
        if principal is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        return principal

    async def _tenant_principal(self, token: str, digest: bytes) -> Principal | None:
        if self._directory is None or not token.startswith(KEY_PREFIX):
            return None
        if self._cache_s <= 0:  # no cache: every request asks the database itself
            return await self._query(token, digest, self._generation)
        cached = self._cache.get(digest)
        if cached is not None:
            left = cached[1] - time.monotonic()
            if left > 0:
                if left < self._cache_s / 2 and digest not in self._lookups:
                    self._lookup(token, digest)  # refreshed in the background; this request goes on
                return cached[0]
        # shield: a request that goes away leaves the query to the others waiting for it
        return await asyncio.shield(self._lookups.get(digest) or self._lookup(token, digest))

    def _lookup(self, token: str, digest: bytes) -> asyncio.Task[Principal | None]:
        task = asyncio.create_task(self._query(token, digest, self._generation))
        self._lookups[digest] = task
        self._running.add(task)
        task.add_done_callback(lambda done: self._lookup_done(digest, done))
        return task

    def _lookup_done(self, digest: bytes, task: asyncio.Task[Principal | None]) -> None:
        self._running.discard(task)
        if self._lookups.get(digest) is task:
            del self._lookups[digest]
        if not task.cancelled():
            task.exception()  # retrieved: a background refresh's failure is the next request's to report

    async def _query(self, token: str, digest: bytes, generation: int) -> Principal | None:
        assert self._directory is not None
        started = time.monotonic()  # the entry's age counts from the query, not from its answer
        owner = await asyncio.to_thread(self._directory.find_key, token)
        current = generation == self._generation
        if owner is None or owner.key.revoked_at is not None or owner.tenant.disabled:
            if current:
                self._cache.pop(digest, None)
            return None
        principal = principal_for(owner, self._defaults)
        if current and self._cache_s > 0:
            if len(self._cache) >= _MAX_CACHED_KEYS:
                self._cache.clear()  # crude but bounded; the next requests refill it
            self._cache[digest] = (principal, started + self._cache_s)
        return principal

    def forget(self, *, key_id: str | None = None, tenant: str | None = None) -> None:
        """Drop cached keys (one key, or every key of a tenant) after the admin API changed them."""
        for digest, (principal, _) in list(self._cache.items()):
            if principal.subject == key_id or principal.tenant == tenant:
                del self._cache[digest]
        # A lookup running now may have read the key before the change: it caches nothing, and requests from
        # now on start their own.
        self._generation += 1
        self._lookups.clear()

    async def close(self) -> None:
        """Stop lookups still running (background refreshes), before the database closes."""
        tasks = list(self._running)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def identify(app_state: Any, authorization: str | None, state: dict[str, Any]) -> Principal:
    """The caller of ``authorization``, or 401; left in the request's ``state`` (the metrics label by its tenant)."""
    authenticator: Authenticator = app_state.authenticator
    principal = await authenticator.authenticate(authorization)
    state["principal"] = principal
    return principal


async def get_principal(request: Request) -> Principal:
    """FastAPI dependency: the authenticated caller, or 401."""
    return await identify(
        request.app.state, request.headers.get("authorization"), request.scope.setdefault("state", {})
    )


async def require_admin(request: Request) -> Principal:
    """FastAPI dependency of the admin API: the admin key, else 401 (no key) or 403 (a tenant's key).

    403 rather than 404: the admin API's routes are documented and the same for
    every deployment, so hiding them protects nothing, while a 403 tells an
    operator who used a tenant key by mistake what is wrong. (Tenant *objects*
    are another matter: those answer 404 to other tenants, see tenancy/namespace.py.)
    """
    principal = await get_principal(request)
    if not principal.is_admin:
        raise PermissionDenied("This endpoint needs the admin API key.")
    return principal


async def is_admin(request: Request) -> bool:
    """Whether the request carries the admin key, for routes that answer everyone but show the admin more."""
    authenticator: Authenticator | None = getattr(request.app.state, "authenticator", None)
    if authenticator is None or not request.headers.get("authorization"):
        return False
    try:
        return (await authenticator.authenticate(request.headers.get("authorization"))).is_admin
    except (AuthenticationFailed, ServiceUnavailable):
        return False


PrincipalDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[Principal, Depends(require_admin)]
