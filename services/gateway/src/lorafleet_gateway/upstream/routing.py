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

Merged replicas (see hot_adapters.py) come first and stand apart: an adapter
merged into some replica's weights goes to the least loaded of those while it
has fewer than ``merged_max_in_flight`` requests ("merged"); past that, or
when none is merged, rules 1-3 apply over the replicas in LoRA mode. A merged
replica serves its adapter only, and is never chosen for anything else. If no
LoRA replica is left, an overloaded merged one still beats no answer, and
after it a replica switching into a mode that will serve the request (it
holds the request until its switch ends: "switching"). A replica switching
mode is otherwise skipped.

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

Reason = Literal["merged", "affinity", "hashed", "least_loaded", "switching"]
# A replica's serving mode as routing needs it: LoRA (base model and any adapter), merged (its merged adapter
# only), switching (draining into or out of a merge: nothing new).
Mode = Literal["lora", "merged", "switching"]


@dataclass(frozen=True)
class ReplicaLoad:
    """What routing knows about one candidate replica."""

    target: str
    load: int  # requests in flight or queued there (see ReplicaSet.load)
    adapters: frozenset[str] = field(default_factory=frozenset)  # "name@version" loaded in its engine
    mode: Mode = "lora"
    # "name@version" merged into its weights when mode is "merged"; while switching, what it will be ("": LoRA)
    merged_adapter: str = ""

    def merged_with(self, adapter: str) -> bool:
        return self.mode == "merged" and bool(adapter) and same_adapter(self.merged_adapter, adapter)

    def serves(self, adapter: str) -> bool:
        """Whether this replica, in its mode, can take a request for ``adapter`` ("" for the base model)."""
        return self.mode == "lora" or self.merged_with(adapter)

    def will_serve(self, adapter: str) -> bool:
        """Whether this replica is switching into a mode that serves ``adapter``: to LoRA, or merging it."""
        return self.mode == "switching" and (
            not self.merged_adapter or (bool(adapter) and same_adapter(self.merged_adapter, adapter))
        )


def same_adapter(entry: str, adapter: str) -> bool:
    """Whether a replica's "name@version" ``entry`` is ``adapter`` ("name": any version; "name@version": that one)."""
    return entry == adapter or ("@" not in adapter and entry.partition("@")[0] == adapter)


def load_bound(loads: Sequence[int], load_factor: float, min_slack: int) -> float:
    average = (sum(loads) + 1) / len(loads)
    return max(load_factor * average, average + min_slack)


def rendezvous_score(adapter: str, target: str) -> int:
    digest = hashlib.blake2b(f"{adapter}|{target}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _rotate(replicas: Sequence[ReplicaLoad], turn: int) -> list[ReplicaLoad]:
    start = turn % len(replicas)
    return [*replicas[start:], *replicas[:start]]


def choose(
    replicas: Sequence[ReplicaLoad],
    adapter: str,
    *,
    load_factor: float = 1.25,
    min_slack: int = 2,
    turn: int = 0,
    merged_max_in_flight: int = 64,
) -> tuple[ReplicaLoad, Reason] | None:
    """The replica for a request naming ``adapter`` ("" for the base model), and why; None if none can serve it."""
    merged = [r for r in replicas if r.merged_with(adapter)]
    open_merged = [r for r in merged if r.load < merged_max_in_flight]
    if open_merged:
        return min(_rotate(open_merged, turn), key=lambda r: r.load), "merged"
    lora = [r for r in replicas if r.mode == "lora"]
    if not lora:
        if merged:
            return min(_rotate(merged, turn), key=lambda r: r.load), "merged"
        switching = [r for r in replicas if r.will_serve(adapter)]
        return (min(_rotate(switching, turn), key=lambda r: r.load), "switching") if switching else None
    replicas = lora
    rotated = _rotate(replicas, turn)
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
