"""The hot-adapter planner: merge the adapter that dominates traffic into one replica's weights; undo it when it cools.

vLLM's LoRA kernels cost throughput (a third of it with one adapter on an
H100: docs/benchmarks.md). A replica with an adapter merged into its base
weights serves that adapter at base-model speed, but nothing else. So a merge
pays only for an adapter that carries a large part of the traffic, and must
never leave the base model and the other adapters without a replica.

The gateway counts the tokens (prompt + completion) it served per adapter
version over the last ``window_s``. Every ``interval_s`` the planner makes at
most one change, and none while a replica is switching (each change drains a
replica, so changes are paced):

1. merge: the hottest adapter with a share of all tokens >= ``merge_share``
   and a rate >= ``min_tokens_per_s`` that no replica has merged yet goes
   onto a healthy merge-capable replica: one merged with an adapter whose
   share is under ``unmerge_share`` and that has held its merge for
   ``min_hold_s``, else the LoRA replica with the adapter loaded or the least
   load; never the last healthy LoRA replica unless ``allow_all_replicas``.
2. unmerge: a replica whose merged adapter stayed under ``unmerge_share`` for
   a whole window (and held ``min_hold_s``) goes back to LoRA mode.

The gap between the two shares is the hysteresis: an adapter hovering near one
threshold does not flip a replica back and forth. A replica that refuses a
switch (its own minimum hold is longer), or fails one, is left alone for a
window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import grpc

from lorafleet.inference.v1 import inference_pb2
from lorafleet_gateway.metrics import GatewayMetrics
from lorafleet_gateway.upstream.inference import InferencePool
from lorafleet_gateway.upstream.replicas import Replica
from lorafleet_gateway.upstream.routing import Mode

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
Action = Literal["merge", "unmerge"]


@dataclass(frozen=True)
class MergePolicy:
    """The planner's thresholds (GatewaySettings.merge_* describe each)."""

    interval_s: float = 10.0
    window_s: float = 60.0
    merge_share: float = 0.5
    unmerge_share: float = 0.2
    min_tokens_per_s: float = 100.0
    min_hold_s: float = 300.0
    timeout_s: float = 600.0
    allow_all_replicas: bool = False


@dataclass(frozen=True)
class ReplicaState:
    """What the planner knows about one replica."""

    target: str
    healthy: bool
    merge_capable: bool
    mode: Mode = "lora"
    merged_adapter: str = ""  # "name@version" (while switching: the target, "" when unmerging)
    merged_for_s: float = 0.0
    load: int = 0
    adapters: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class MergeDecision:
    target: str
    adapter: str  # what to merge; "" to return to LoRA mode
    action: Action
    why: str


class TokenWindow:
    """Tokens per adapter over the last ``window_s``, in one-second buckets (memory: window_s x active adapters)."""

    def __init__(self, window_s: float, clock: Clock) -> None:
        self._window_s = window_s
        self._clock = clock
        self._buckets: deque[tuple[int, dict[str, int]]] = deque()

    def add(self, adapter: str, tokens: int) -> None:
        second = int(self._clock())
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append((second, {}))
            self._expire(second)
        bucket = self._buckets[-1][1]
        bucket[adapter] = bucket.get(adapter, 0) + tokens

    def totals(self) -> dict[str, int]:
        self._expire(int(self._clock()))
        totals: dict[str, int] = {}
        for _, bucket in self._buckets:
            for adapter, tokens in bucket.items():
                totals[adapter] = totals.get(adapter, 0) + tokens
        return totals

    def _expire(self, now: int) -> None:
        while self._buckets and self._buckets[0][0] <= now - self._window_s:
            self._buckets.popleft()


class HotAdapterTracker:
    """Counts traffic and decides (no I/O): ``record`` per finished request, ``decide`` every interval."""

    def __init__(self, policy: MergePolicy, clock: Clock = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._window = TokenWindow(policy.window_s, clock)
        self._cool_since: dict[str, float] = {}  # merged adapter -> when its share last fell under unmerge_share
        self._blocked_until: dict[str, float] = {}  # replica -> no calls before then (it refused or failed one)

    def record(self, adapter: str, tokens: int) -> None:
        """Tokens served for ``adapter`` ("name@version"; "" for the base model)."""
        if tokens > 0:
            self._window.add(adapter, tokens)

    def shares(self) -> dict[str, float]:
        return _shares(self._window.totals())

    def block(self, target: str) -> None:
        self._blocked_until[target] = self._clock() + self.policy.window_s

    def decide(self, replicas: Sequence[ReplicaState]) -> MergeDecision | None:
        """The one change to make now, if any (see the module docstring)."""
        now, policy = self._clock(), self.policy
        totals = self._window.totals()
        shares = _shares(totals)
        merged = {r.merged_adapter for r in replicas if r.mode == "merged" and r.merged_adapter}
        self._track_cooling(merged, shares, now)
        if any(r.mode == "switching" and r.healthy for r in replicas):
            return None
        served = {r.merged_adapter for r in replicas if r.mode == "merged" and r.healthy}
        usable = [r for r in replicas if r.healthy and self._blocked_until.get(r.target, 0.0) <= now]
        hot = sorted(
            (
                (share, adapter)
                for adapter, share in shares.items()
                if adapter
                and adapter not in served
                and share >= policy.merge_share
                and totals[adapter] / policy.window_s >= policy.min_tokens_per_s
            ),
            reverse=True,
        )
        for share, adapter in hot:
            target = self._merge_target(usable, replicas, adapter, shares)
            if target is not None:
                rate = totals[adapter] / policy.window_s
                why = f"{share:.0%} of tokens, {rate:.0f} tokens/s over {policy.window_s:g}s"
                return MergeDecision(target.target, adapter, "merge", why)
        for replica in sorted(usable, key=lambda r: r.target):
            cool_since = self._cool_since.get(replica.merged_adapter)
            if (
                replica.mode == "merged"
                and cool_since is not None
                and now - cool_since >= policy.window_s
                and replica.merged_for_s >= policy.min_hold_s
            ):
                share = shares.get(replica.merged_adapter, 0.0)
                why = f"{share:.0%} of tokens, under {policy.unmerge_share:.0%} for {now - cool_since:.0f}s"
                return MergeDecision(replica.target, "", "unmerge", why)
        return None

    def _track_cooling(self, merged: set[str], shares: Mapping[str, float], now: float) -> None:
        for adapter in merged:
            if shares.get(adapter, 0.0) < self.policy.unmerge_share:
                self._cool_since.setdefault(adapter, now)
            else:
                self._cool_since.pop(adapter, None)
        for adapter in set(self._cool_since) - merged:
            del self._cool_since[adapter]

    def _merge_target(
        self,
        usable: Sequence[ReplicaState],
        everyone: Sequence[ReplicaState],
        adapter: str,
        shares: Mapping[str, float],
    ) -> ReplicaState | None:
        policy = self.policy
        capable = [r for r in usable if r.merge_capable]
        # A replica merged with an adapter that has cooled serves little: reuse it first, it costs no LoRA capacity.
        recyclable = [
            r
            for r in capable
            if r.mode == "merged"
            and shares.get(r.merged_adapter, 0.0) < policy.unmerge_share
            and r.merged_for_s >= policy.min_hold_s
        ]
        if recyclable:
            return min(recyclable, key=lambda r: (shares.get(r.merged_adapter, 0.0), r.load, r.target))
        lora = [r for r in capable if r.mode == "lora"]
        healthy_lora = sum(1 for r in everyone if r.healthy and r.mode == "lora")
        if not lora or (healthy_lora <= 1 and not policy.allow_all_replicas):
            return None  # the base model and the other adapters keep a replica
        # Where the adapter is loaded already its weights are on local disk: the merge starts sooner.
        return min(lora, key=lambda r: (adapter not in r.adapters, r.load, r.target))


def _shares(totals: Mapping[str, int]) -> dict[str, float]:
    """Each adapter's share of all tokens ({} without traffic: every merged adapter then counts as cool)."""
    total = sum(totals.values())
    return {adapter: tokens / total for adapter, tokens in totals.items()} if total else {}


def state_of(replica: Replica, now: float) -> ReplicaState:
    # merged_for_s is as of the last Stats answer; age it by the time since.
    held = replica.merged_for_s + max(0.0, now - replica.stats_at) if replica.mode == "merged" else 0.0
    return ReplicaState(
        target=replica.target,
        healthy=not replica.ejected,
        merge_capable=replica.merge_capable,
        mode=replica.mode,
        merged_adapter=replica.merged_adapter,
        merged_for_s=held,
        load=replica.load,
        adapters=replica.adapters,
    )


class HotAdapterPlanner:
    """Runs the tracker's decisions against the pool's replicas (MergeAdapter), every ``interval_s``."""

    def __init__(self, pool: InferencePool, policy: MergePolicy, metrics: GatewayMetrics) -> None:
        self._pool = pool
        self._metrics = metrics
        self.tracker = HotAdapterTracker(policy)
        self._task: asyncio.Task[None] | None = None

    def record(self, adapter: str, tokens: int) -> None:
        self.tracker.record(adapter, tokens)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._every_interval(), name="hot-adapter-planner")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()  # a MergeAdapter call in flight is cancelled with it; the replica finishes alone
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.tracker.policy.interval_s)
            try:
                await self.run_once()
            except Exception:  # the loop must outlive any one bad round
                logger.exception("hot-adapter planning failed")

    async def run_once(self) -> MergeDecision | None:
        """Decide now and carry the decision out; returns it."""
        shares = self.tracker.shares()
        self._metrics.hot_adapter_share.set(max((s for a, s in shares.items() if a), default=0.0))
        now = time.monotonic()
        replicas = {r.target: r for r in self._pool.replicas}
        decision = self.tracker.decide([state_of(r, now) for r in replicas.values()])
        if decision is not None and decision.target in replicas:
            await self._apply(replicas[decision.target], decision)
        return decision

    async def _apply(self, replica: Replica, decision: MergeDecision) -> None:
        what = f"merge {decision.adapter} into" if decision.adapter else f"unmerge {replica.merged_adapter} from"
        logger.info("hot-adapter planner: %s replica %s (%s)", what, replica.target, decision.why)
        replica_set = self._pool.replica_set
        before = replica.merge_state, replica.merged_adapter, replica.merged_for_s
        # Routing stops sending it anything new now, not at the next Stats poll.
        switching = inference_pb2.MERGE_STATE_MERGING if decision.adapter else inference_pb2.MERGE_STATE_UNMERGING
        replica_set.set_merge_state(replica, switching, decision.adapter)
        request = inference_pb2.MergeAdapterRequest(adapter=decision.adapter)
        try:
            answer = await replica.stub.MergeAdapter(request, timeout=self.tracker.policy.timeout_s)
        except grpc.aio.AioRpcError as exc:
            outcome = _OUTCOMES.get(exc.code(), "failed")
            logger.warning(
                "hot-adapter planner: %s replica %s: %s %s", what, replica.target, exc.code().name, exc.details()
            )
            if outcome == "refused":  # nothing changed there
                replica_set.set_merge_state(replica, *before)
            else:  # it may be anywhere in the cycle: ask
                await replica_set.refresh(replica)
            self.tracker.block(replica.target)  # and do not ask it again for a window
            self._metrics.merge_decisions.labels(action=decision.action, outcome=outcome).inc()
            return
        state = inference_pb2.MERGE_STATE_MERGED if answer.merged_adapter else inference_pb2.MERGE_STATE_LORA
        replica_set.set_merge_state(replica, state, answer.merged_adapter)
        outcome = "ok" if answer.changed else "unchanged"
        logger.info(
            "hot-adapter planner: replica %s now %s (drain %.1fs, weights %.1fs)",
            replica.target,
            f"merged with {answer.merged_adapter}" if answer.merged_adapter else "in LoRA mode",
            answer.drain_s,
            answer.merge_s,
        )
        self._metrics.merge_decisions.labels(action=decision.action, outcome=outcome).inc()


_OUTCOMES = {
    grpc.StatusCode.FAILED_PRECONDITION: "refused",  # not merge-capable, or its minimum hold is not over
    grpc.StatusCode.DEADLINE_EXCEEDED: "timeout",
}
