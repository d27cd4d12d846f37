"""The merged-mode stage of bench/gpu_serving.py: one hot adapter served from a replica that has it merged into its
base weights (no LoRA kernels on the path), against the same adapter through LoRA and the base model of the same run.

Two ways in:
  * explicit: ``MergeAdapter`` over gRPC, then the throughput passes of one adapter (gateway and direct), then
    ``MergeAdapter("")`` back to LoRA mode, each switch timed;
  * automatic: the hot-adapter planner of a gateway started for this stage (its traffic only) sees one adapter take
    all the tokens and merges it; passes of that adapter run through it until the replica reports MERGED, then a
    measured pass. The stage reports how long after the first request the merge came and what every pass got.
"""

from __future__ import annotations

import time
from typing import Any

from serving import report
from serving.stages import TENANT

MERGED = 2  # lorafleet.inference.v1.MergeState.MERGE_STATE_MERGED

# The planner gateway's settings for a one-replica run: decide every second over a 10 s window, and let it merge
# the only replica (base-model requests then get 503 until it unmerges; none are sent meanwhile).
PLANNER_GATEWAY_ENV = {
    "LORAFLEET_GATEWAY_MERGE_ENABLED": "true",
    "LORAFLEET_GATEWAY_MERGE_INTERVAL_S": "1",
    "LORAFLEET_GATEWAY_MERGE_WINDOW_S": "10",
    "LORAFLEET_GATEWAY_MERGE_MIN_HOLD_S": "0",
    "LORAFLEET_GATEWAY_MERGE_MIN_TOKENS_PER_S": "0",
    "LORAFLEET_GATEWAY_MERGE_ALLOW_ALL_REPLICAS": "true",
}
REPLICA_ENV = {"LORAFLEET_INFERENCE_MERGE_ENABLED": "true", "LORAFLEET_INFERENCE_MERGE_MIN_HOLD_S": "0"}


def _stub(direct: str) -> Any:
    import grpc

    from lorafleet.inference.v1 import inference_pb2_grpc

    return inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(direct))


def switch(direct: str, adapter: str) -> dict[str, Any]:
    """MergeAdapter(adapter) (empty: back to LoRA mode), forced; what the replica reported and the call's wall."""
    from lorafleet.inference.v1 import inference_pb2

    started = time.perf_counter()
    reply = _stub(direct).MergeAdapter(inference_pb2.MergeAdapterRequest(adapter=adapter, force=True), timeout=900)
    return {
        "wall_s": time.perf_counter() - started,
        "drain_s": reply.drain_s,
        "merge_s": reply.merge_s,
        "merged_adapter": reply.merged_adapter,
        "changed": reply.changed,
    }


def merge_state(direct: str) -> tuple[int, str]:
    from lorafleet.inference.v1 import inference_pb2

    stats = _stub(direct).Stats(inference_pb2.StatsRequest(), timeout=10)
    return int(stats.merge_state), str(stats.merged_adapter)


def explicit(bench: Any, adapter: str, metrics_url: str, gateway_metrics: str) -> dict[str, Any]:
    """Merge ``adapter`` by RPC, measure its passes, return to LoRA mode."""
    row: dict[str, Any] = {"merge": switch(bench.direct, adapter)}
    bench.run.log(f"merged {adapter} in {row['merge']['wall_s']:.2f} s (weights {row['merge']['merge_s']:.2f} s)")
    row["throughput"] = bench.throughput("1 adapter, merged", [adapter], metrics_url, gateway_metrics)
    row["unmerge"] = switch(bench.direct, "")
    bench.run.log(f"back to LoRA mode in {row['unmerge']['wall_s']:.2f} s")
    return row


def automatic(bench: Any, adapter: str, planner_url: str, max_passes: int = 8) -> dict[str, Any]:
    """Passes of ``adapter`` through the planner gateway until the replica is merged with it, then one more."""
    n, out = bench.args.requests, bench.args.output_tokens
    model_id = adapter.removeprefix(f"{TENANT}/")
    passes: list[dict[str, Any]] = []
    started = time.monotonic()
    merged_after_s = None
    for _ in range(max_passes):
        calls = [(model_id, p) for p in bench.prompts(n)]
        level = bench.pool.run("gateway", [planner_url], calls, out, n, key=bench.key, base_model=bench.base)
        state, merged = merge_state(bench.direct)
        passes.append(report.summarize(level) | {"state_after": state, "merged_after": merged})
        bench.run.log(f"planner pass {len(passes)}: {passes[-1]['out_tok_s']:.0f} tok/s, state {state} {merged!r}")
        if merged_after_s is not None:
            break  # this pass ran merged from its start
        if state == MERGED and merged.partition("@")[0] == adapter:
            merged_after_s = time.monotonic() - started
    return {"passes": passes, "merged_after_s": merged_after_s, "merged": merged_after_s is not None}
