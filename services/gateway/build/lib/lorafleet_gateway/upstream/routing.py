"""Which replica serves a request: a pure function of the replicas' loads and loaded adapters.

1. An adapter loaded on some replicas goes to the least loaded of them, as
   long as that replica stays within the load bound ("affinity").
2. Otherwise the adapter goes to the first replica within the bound in its
   rendezvous-hash order of (adapter, replica) ("hashed"). Every gateway
   computes the same order, so a cold adapter is loaded on its home replica
   only, not on each replica a round-robin would have sent it to; adapters
   spread evenly over replicas; and a hot adapter that overflows its home
   spills to its second replica, then its third: it replicates under load,
   in a fixed order, and nowhere else.
3. If every replica is over the bound, and for the base model, the least
   loaded replica ("least_loaded"). Ties rotate with ``turn``, so idle
   replicas take turns.

The bound is consistent hashing with bounded loads (Mirrokni et al., 2018):
a replica may take the request while its load stays at most
max(load_factor x average, average + min_slack), the average counting the
new request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Reason = Literal["affinity", "hashed", "least_loaded"]


@dataclass(frozen=True)
class ReplicaLoad:
    """What routing knows about one candidate replica."""

    target: str
    load: int  # requests in flight or queued there (see ReplicaSet.load)
    adapters: frozenset[str] = field(default_factory=frozenset)  # "name@version" loaded in its engine


def load_bound(loads: Sequence[int], load_factor: float, min_slack: int) -> float:
    average = (sum(loads) + 1) / len(loads)
    return max(load_factor * average, average + min_slack)


def rendezvous_score(adapter: str, target: str) -> int:
    digest = hashlib.blake2b(f"{adapter}|{target}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def choose(
    replicas: Sequence[ReplicaLoad],
    adapter: str,
    *,
    load_factor: float = 1.25,
    min_slack: int = 2,
    turn: int = 0,
) -> tuple[ReplicaLoad, Reason] | None:
    """The replica for a request naming ``adapter`` ("" for the base model), and why; None if no candidates."""
    if not replicas:
        return None
    start = turn % len(replicas)
    rotated = [*replicas[start:], *replicas[:start]]
    bound = load_bound([r.load for r in replicas], load_factor, min_slack)

    def fits(replica: ReplicaLoad) -> bool:
        return replica.load + 1 <= bound

    if adapter:
        holders = [r for r in rotated if adapter in r.adapters and fits(r)]
        if holders:
            return min(holders, key=lambda r: r.load), "affinity"
        for replica in sorted(replicas, key=lambda r: rendezvous_score(adapter, r.target), reverse=True):
            if fits(replica):
                return replica, "hashed"
    return min(rotated, key=lambda r: r.load), "least_loaded"
