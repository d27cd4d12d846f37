"""Merged mode, the service's side: MergeAdapter's switches, which Generate calls each mode admits, Stats.

A merge-capable replica (``merge_enabled``) is in one of the contract's four MergeStates:

* LORA: the normal mode, the base model and any adapter through vLLM's LoRA.
* MERGING: draining, then adding one adapter into the base weights. Requests for that adapter wait for the
  switch; any other gets FAILED_PRECONDITION "replica is switching to merged mode for X@v ...".
* MERGED: serves that adapter only, by name or name@version, with ``lora_request=None`` (no LoRA cost); any
  other request gets FAILED_PRECONDITION "replica is merged for X@v ...". An unversioned name is served only
  while its LATEST is still the merged version, so a merged replica never answers for another version than a
  LoRA replica would.
* UNMERGING: draining, then restoring the base weights; every request waits for LoRA mode.

A switch: the adapter is resolved, fetched and validated like any load (disk tier, sha256, base model, rank)
while the replica still serves; then the state changes, the requests in flight finish (at most
``merge_drain_timeout_s``: if some still run then, the switch is abandoned and the state goes back; streams are
never cut), the workers change the weights (``merge_worker``, by collective RPC), and the prefix cache is reset,
since its KV blocks were computed with the old weights.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from lorafleet.inference.v1 import inference_pb2 as pb
from lorafleet_common.names import parse_adapter_ref
from lorafleet_inference.adapters import AdapterManager, LoadedAdapter
from lorafleet_inference.errors import AdapterRejected, ServiceUnavailable, ServingModeConflict
from lorafleet_inference.metrics import InferenceMetrics

log = logging.getLogger(__name__)

# Worker methods (merge_worker.MergeWorkerExtension); named here so this process need not import the worker side.
MERGE_RPC = "lorafleet_merge_adapter"
RESTORE_RPC = "lorafleet_restore_base"
PREFIX_RESET_WAIT_S = 5.0  # the engine frees a drained request's KV blocks a step after its last output
_STATE_NAMES = {
    pb.MERGE_STATE_LORA: "LoRA mode",
    pb.MERGE_STATE_MERGING: "merging",
    pb.MERGE_STATE_MERGED: "merged",
    pb.MERGE_STATE_UNMERGING: "unmerging",
}


@dataclass(frozen=True)
class MergePolicy:
    """The replica's merge settings (``merge_*`` in InferenceSettings)."""

    enabled: bool = False
    min_hold_s: float = 300.0
    drain_timeout_s: float = 60.0
    weights_timeout_s: float = 120.0  # bound on the workers' weight update (load_timeout_s)


class MergeEngine(Protocol):
    """What a switch calls on vLLM's AsyncLLM (both 0.26 and 0.32 have these)."""

    async def collective_rpc(
        self,
        method: str,
        timeout: float | None = None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]: ...

    async def reset_prefix_cache(self) -> bool: ...


class _Refused(Exception):
    """The workers refused the adapter; their weights did not change."""


class MergeController:
    """The merge state of one replica; switches run one at a time."""

    def __init__(
        self,
        engine: MergeEngine,
        adapters: AdapterManager,
        policy: MergePolicy,
        *,
        wait_idle: Callable[[float], Awaitable[bool]],
        in_flight: Callable[[], int],
        metrics: InferenceMetrics,
    ) -> None:
        self.engine = engine
        self.adapters = adapters
        self.policy = policy
        self.metrics = metrics
        self._wait_idle = wait_idle
        self._in_flight = in_flight
        self.state: pb.MergeState = pb.MERGE_STATE_LORA
        self.merged: LoadedAdapter | None = None  # the adapter in the weights now
        self._merged_at = 0.0
        self._target = ""  # during a switch: the key being merged ("" = LoRA mode)
        self._broken = ""  # set if a failed switch could not restore the weights: nothing is served after that
        self._switching = False  # one switch at a time
        self._switched = asyncio.Event()
        self._switched.set()
        self.held = 0  # Generate calls waiting for a switch to finish
        self._update_metrics()

    # ----- Generate admission ------------------------------------------------------------------

    async def admit(self, ref: str) -> LoadedAdapter | None:
        """What serves a Generate for ``ref`` now: None for the normal path (base model or LoRA), or the merged
        adapter (run without LoRA). Waits out a switch the request can wait for; ServingModeConflict for what
        this mode does not serve. Nothing is awaited after the final state check, so the caller can count the
        request in flight before the next switch starts draining."""
        deadline = time.monotonic() + self.policy.drain_timeout_s + self.policy.weights_timeout_s
        while True:
            if self._broken:
                raise ServiceUnavailable(self._broken)
            if self.state == pb.MERGE_STATE_LORA:
                return None
            if self.state == pb.MERGE_STATE_MERGED:
                merged = self.merged
                assert merged is not None
                same, named = await self._names(ref, merged.key)
                if self.state != pb.MERGE_STATE_MERGED or self.merged is not merged:
                    continue  # a switch began while the name resolved
                if same:
                    return merged
                raise ServingModeConflict(
                    f"replica is merged for {merged.key}: it serves only that adapter, not {named}"
                )
            if self.state == pb.MERGE_STATE_MERGING:
                target = self._target
                same, named = await self._names(ref, target)
                if not same and self._target == target and self.state == pb.MERGE_STATE_MERGING:
                    raise ServingModeConflict(
                        f"replica is switching to merged mode for {target}: "
                        f"it will serve only that adapter, not {named}"
                    )
            await self._wait_for_switch(deadline)

    async def _names(self, ref: str, key: str) -> tuple[bool, str]:
        """Whether ``ref`` names the adapter version ``key``, and what it names (for messages). Only a ref with the
        same name is resolved: other names cost no store call."""
        if not ref:
            return False, "the base model"
        name, version = key.split("@", 1)
        parsed = parse_adapter_ref(ref)
        if parsed.name != name:
            return False, ref
        resolved = parsed.version or (await self.adapters.resolve(ref))[1]
        return resolved == version, f"{name}@{resolved}"

    async def _wait_for_switch(self, deadline: float) -> None:
        self.held += 1
        try:
            await asyncio.wait_for(self._switched.wait(), max(0.0, deadline - time.monotonic()))
        except TimeoutError as exc:
            raise ServiceUnavailable("replica is switching between LoRA and merged mode and has not finished") from exc
        finally:
            self.held -= 1

    # ----- MergeAdapter ------------------------------------------------------------------------

    async def switch(self, ref: str, *, force: bool = False) -> pb.MergeAdapterResponse:
        """Merge ``ref`` ("" = back to LoRA mode); see the module docstring and MergeAdapter in the contract."""
        if not self.policy.enabled:
            if not ref:
                return pb.MergeAdapterResponse(changed=False)  # already in LoRA mode, the only one it has
            raise ServingModeConflict(
                "this replica is not merge-capable: it runs with LORAFLEET_INFERENCE_MERGE_ENABLED=false"
            )
        if self._switching:
            raise ServingModeConflict(f"replica is switching ({self._describe_switch()}); try again when it is done")
        self._switching = True
        # A task of its own, shielded: a caller that goes away (a deadline) must not leave a switch half done,
        # with the weights and the state apart. It finishes alone and the next Stats shows the outcome.
        task = asyncio.ensure_future(self._switch(ref, force))
        task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    async def _switch(self, ref: str, force: bool) -> pb.MergeAdapterResponse:
        try:
            if self._broken:
                raise ServiceUnavailable(self._broken)
            if not ref:
                if self.merged is None:
                    return pb.MergeAdapterResponse(changed=False)
                self._check_hold(force)
                return await self._run_switch(None)
            try:
                async with self.adapters.validated_copy(ref) as target:
                    if self.merged is not None and self.merged.key == target.key:
                        return pb.MergeAdapterResponse(merged_adapter=target.key, changed=False)
                    self._check_hold(force)
                    return await self._run_switch(target)
            except AdapterRejected:
                self.metrics.merge_switches.labels("rejected").inc()
                raise
        finally:
            self._switching = False

    def _check_hold(self, force: bool) -> None:
        if self.merged is None or force:
            return
        age = time.monotonic() - self._merged_at
        if age < self.policy.min_hold_s:
            raise ServingModeConflict(
                f"replica is merged for {self.merged.key} since {age:.0f} s, less than its minimum hold of "
                f"{self.policy.min_hold_s:g} s (merge_min_hold_s); pass force to switch now"
            )

    async def _run_switch(self, target: LoadedAdapter | None) -> pb.MergeAdapterResponse:
        previous = self.state
        self.state = pb.MERGE_STATE_MERGING if target else pb.MERGE_STATE_UNMERGING
        self._target = target.key if target else ""
        self._switched.clear()
        self._update_metrics()
        result = "error"
        try:
            started = time.monotonic()
            if not await self._wait_idle(self.policy.drain_timeout_s):
                result = "drain_timeout"
                self.state = previous
                raise ServiceUnavailable(
                    f"the switch to {self._describe_switch()} was abandoned: {self._in_flight()} requests were still "
                    f"in flight after {self.policy.drain_timeout_s:g} s (merge_drain_timeout_s); the replica stays "
                    f"{self._describe_state()}"
                )
            drain_s = time.monotonic() - started
            started = time.monotonic()
            await self._update_weights(target, previous)
            weights_s = time.monotonic() - started
            result = "ok"
        except _Refused as exc:
            result = "rejected"
            assert target is not None
            raise AdapterRejected(target.key, [f"it cannot be merged into this model: {exc}"]) from exc
        finally:
            self._target = ""
            self._switched.set()
            if result != "rejected":  # switch() counts rejections, those of validation included
                self.metrics.merge_switches.labels(result).inc()
            self._update_metrics()
        self.metrics.merge_switch_seconds.labels("drain").observe(drain_s)
        self.metrics.merge_switch_seconds.labels("weights").observe(weights_s)
        log.info("now %s (drain %.2f s, weights %.2f s)", self._describe_state(), drain_s, weights_s)
        key = self.merged.key if self.merged else ""
        return pb.MergeAdapterResponse(merged_adapter=key, changed=True, drain_s=drain_s, merge_s=weights_s)

    async def _update_weights(self, target: LoadedAdapter | None, previous: pb.MergeState) -> None:
        """The workers' part of a switch; sets the resulting state whatever happens."""
        try:
            if target is None:
                await self._rpc(RESTORE_RPC)
            else:
                results = await self._rpc(MERGE_RPC, str(target.path), target.key)
                refusals = sorted({str(r.get("refused")) for r in results if r.get("refused")})
                if refusals:
                    if any(r.get("merged") == target.key for r in results):  # ranks disagreed: undo them all
                        await self._restore_after_failure()
                    else:
                        self.state = previous  # the weights did not change
                    raise _Refused("; ".join(refusals))
            # The new state admits requests: only once no cached KV block of the old weights can serve them.
            await self._reset_prefix_cache()
            self.state, self.merged = (pb.MERGE_STATE_MERGED, target) if target else (pb.MERGE_STATE_LORA, None)
            self._merged_at = time.monotonic()
        except _Refused:
            raise
        except Exception as exc:
            log.exception("switching to %s failed", self._describe_switch())
            await self._restore_after_failure()
            raise ServiceUnavailable(
                f"switching to {self._describe_switch()} failed ({exc}); the base weights are restored and the "
                "replica is in LoRA mode"
            ) from exc

    async def _restore_after_failure(self) -> None:
        try:
            await self._rpc(RESTORE_RPC)
            await self._reset_prefix_cache()
        except Exception as exc:
            self._broken = f"this replica's weights are in an unknown state after a failed merge ({exc}); restart it"
            log.exception("could not restore the base weights")
            raise ServiceUnavailable(self._broken) from exc
        self.state, self.merged = pb.MERGE_STATE_LORA, None

    async def _rpc(self, method: str, *args: Any) -> list[dict[str, Any]]:
        call = self.engine.collective_rpc(method, args=args)
        results = await asyncio.wait_for(call, self.policy.weights_timeout_s)
        return [r if isinstance(r, dict) else {} for r in results]

    async def _reset_prefix_cache(self) -> None:
        deadline = time.monotonic() + PREFIX_RESET_WAIT_S
        while not await asyncio.wait_for(self.engine.reset_prefix_cache(), PREFIX_RESET_WAIT_S):
            if time.monotonic() > deadline:
                raise RuntimeError("the engine would not reset its prefix cache (KV blocks still in use)")
            await asyncio.sleep(0.05)

    # ----- reporting ---------------------------------------------------------------------------

    def fill_stats(self, stats: pb.StatsResponse) -> None:
        stats.merge_capable = self.policy.enabled
        stats.merge_state = self.state
        if self.state in (pb.MERGE_STATE_MERGING, pb.MERGE_STATE_UNMERGING):
            stats.merged_adapter = self._target
        else:
            stats.merged_adapter = self.merged.key if self.merged else ""
        stats.merged_for_s = time.monotonic() - self._merged_at if self.state == pb.MERGE_STATE_MERGED else 0.0

    def _describe_switch(self) -> str:
        return f"merged mode for {self._target}" if self._target else "LoRA mode"

    def _describe_state(self) -> str:
        if self.state == pb.MERGE_STATE_MERGED and self.merged:
            return f"merged for {self.merged.key}"
        return _STATE_NAMES[self.state]

    def _update_metrics(self) -> None:
        self.metrics.merge_state.set(self.state)
        self.metrics.merged_adapter.clear()
        if self.state == pb.MERGE_STATE_MERGED and self.merged is not None:
            self.metrics.merged_adapter.labels(self.metrics.adapter_label(self.merged.name)).set(1)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Log how a switch failed: its caller may have gone away before it ended."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("MergeAdapter failed: %s", task.exception())
