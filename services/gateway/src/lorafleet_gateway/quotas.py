"""Per-key rate limits: requests per minute and tokens per minute, as token buckets in this process.

Each key has two buckets that hold up to one minute's allowance and refill
continuously. A request takes one from the requests bucket. Tokens are charged
twice: an estimate of the prompt at admission (the gateway has no tokenizer),
then, when the generation ends, the difference to the exact prompt count plus
the completion tokens. The tokens bucket may go below zero (a long answer can
overrun it); the key then waits until it refills, which Retry-After says.

Limits are per gateway process: N gateway replicas admit up to N times the
limit unless a load balancer pins each key to one replica.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from lorafleet_gateway.auth import Principal, identify
from lorafleet_gateway.errors import GatewayError, RequestRateLimited, TokenRateLimited
from lorafleet_gateway.metrics import GatewayMetrics

WINDOW_S = 60.0
CHARS_PER_TOKEN = 4  # a conservative-enough estimate for admission; corrected by the exact usage afterwards


@dataclass
class Bucket:
    level: float
    updated: float
    capacity: int

    def refill(self, capacity: int, now: float) -> None:
        if capacity > self.capacity:
            # The key's limit was raised (the admin API, seen once its cached key is looked up again): what it
            # has used stays used, the rest of the new allowance is there at once. A lowered limit only caps it.
            self.level += capacity - self.capacity
        self.capacity = capacity
        rate = capacity / WINDOW_S
        self.level = min(float(capacity), self.level + (now - self.updated) * rate)
        self.updated = now

    def wait_s(self, capacity: int, needed: float) -> int:
        """Whole seconds until the bucket holds ``needed`` (at least 1)."""
        return max(1, math.ceil((needed - self.level) / (capacity / WINDOW_S)))


def estimate_tokens(chars: int) -> int:
    return chars // CHARS_PER_TOKEN + 1


class RateLimiter:
    """Token buckets per key id. Single-threaded by design: it runs on the event loop only."""

    def __init__(self, metrics: GatewayMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._clock = clock
        self._requests: dict[str, Bucket] = {}
        self._tokens: dict[str, Bucket] = {}

    def _bucket(self, buckets: dict[str, Bucket], key: str, capacity: int) -> Bucket:
        now = self._clock()
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = Bucket(float(capacity), now, capacity)
        bucket.refill(capacity, now)
        return bucket

    def admit_request(self, principal: Principal) -> None:
        """Take one request from the key's allowance, or raise 429 with Retry-After."""
        self._admit(self._requests, principal, principal.rpm_limit, 1, RequestRateLimited, "requests", "RPM")

    def admit_tokens(self, principal: Principal, estimate: int) -> None:
        """Admit a generation while the key has a token left (not in debt), charging its estimated prompt."""
        self._admit(self._tokens, principal, principal.tpm_limit, estimate, TokenRateLimited, "tokens", "TPM")

    def _admit(
        self,
        buckets: dict[str, Bucket],
        principal: Principal,
        limit: int | None,
        charge: int,
        error: type[GatewayError],
        kind: str,
        unit: str,
    ) -> None:
        """Admit while the bucket holds at least one unit (so one large request may go into debt), then charge."""
        if limit is None:
            return
        bucket = self._bucket(buckets, principal.subject, limit)
        if bucket.level < 1:
            wait = bucket.wait_s(limit, 1)
            message = f"Rate limit reached for {kind} per min ({unit}): Limit {limit}. Please try again in {wait}s."
            raise self._rejected(error, principal, message, wait, limit, kind)
        bucket.level -= charge

    def charge_tokens(self, principal: Principal, tokens: int) -> None:
        """Charge (or refund, if negative) tokens after the fact."""
        limit = principal.tpm_limit
        if limit is None or tokens == 0:
            return
        self._bucket(self._tokens, principal.subject, limit).level -= tokens

    def _rejected(
        self, cls: type[GatewayError], principal: Principal, message: str, wait: int, limit: int, kind: str
    ) -> GatewayError:
        self._metrics.rate_limited.labels(tenant=principal.tenant, limit=kind).inc()
        headers = {"Retry-After": str(wait), f"x-ratelimit-limit-{kind}": str(limit)}
        return cls(message, headers=headers)


async def admit(app_state: Any, authorization: str | None, state: dict[str, Any]) -> Principal:
    """The data plane's admission: authenticate, then take one request from the key's RPM (the FastAPI
    dependency below and the generation routes' fast path)."""
    principal = await identify(app_state, authorization, state)
    limiter: RateLimiter = app_state.limiter
    limiter.admit_request(principal)
    return principal


async def admitted_caller(request: Request) -> Principal:
    """FastAPI dependency of the data plane: ``admit``."""
    return await admit(request.app.state, request.headers.get("authorization"), request.scope.setdefault("state", {}))


CallerDep = Annotated[Principal, Depends(admitted_caller)]
