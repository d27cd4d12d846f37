"""bench/gpu_serving.py --quick on the CPU: our inference service and two gateways as processes, the embedded model,
every stage of the GPU benchmark with tiny counts; and its --raw comparison on vLLM's offline engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]
QUICK_OUTPUT_TOKENS = 4  # bench/gpu_serving.py --quick


def run_bench(out: Path, *extra: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_serving.py"), "--quick", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=800,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "(a/b) throughput" in result.stdout, result.stdout
    return dict(json.loads((out / ("raw.json" if "--raw" in extra else "serving.json")).read_text()))


def test_gpu_serving_bench_quick_through_our_services(tmp_path: Path) -> None:
    # The first gateway runs two worker processes: its token counter (checked below) adds up both.
    data = run_bench(
        tmp_path, "--gateway-workers", "2,1", "--latency-gateways", "2", "--bare-relay", "--latency-lean-client"
    )
    assert data["skipped"] == []
    assert set(data["throughput"]) == {"base", "1 adapter", "2 adapters", "3 adapters, 2 slots"}
    for case, row in data["throughput"].items():
        (alone,) = row["more_gateways"]  # the second gateway (one process) alone, after the first (two workers)
        assert alone["workers"] == 1
        # bench/bare_relay.py beside the gateways: a fourth path through the same cases
        paths = ("first_pass", "gateway", "direct", "bare")
        for path, level in [(p, row[p]) for p in paths] + [("gateway 2", alone)]:
            assert level["errors"] == 0, (case, path, level["first_errors"])
            # ignore_eos through the gateway and the gRPC contract: every request makes exactly max_tokens
            assert level["tokens_per_request_min"] == level["tokens_per_request_max"] == QUICK_OUTPUT_TOKENS
            assert level["out_tok_s"] > 0 and level["ttft_p50_ms"] > 0
            # When the first and last tokens came, in seconds from the pass's first request: in order, within it.
            first, end = level["first_token_at_s"], level["end_at_s"]
            assert len(first) == len(end) == len(level["timeline_quantiles"])
            assert first == sorted(first) and end == sorted(end) and first[0] > 0 and first[-1] <= end[-1]
            assert end[-1] <= level["wall_s"] + 0.05
        check = row["gateway"]["check"]  # the replica's and the gateway's token counters match our count
        assert check["bench_tokens"] == check["replica_metric_tokens"] == check["gateway_metric_tokens"] > 0
    assert data["throughput"]["base"]["gateway_all"]["errors"] == 0  # spread over both gateways
    assert set(data["latency"]) == {"1", "2"}
    for row in data["latency"].values():
        assert row["direct"]["errors"] == row["gateway"]["errors"] == 0
        assert row["gateway"]["tpot_p50_ms"] > 0 and row["gateway"]["workers"] == 2
        (other,) = row["more_gateways"]  # the same level through the one-process gateway
        assert other["workers"] == 1 and other["errors"] == 0 and other["tpot_p50_ms"] > 0
        lean = row["gateway_lean"]  # the first gateway again, through the lean HTTP client: every token counted
        assert lean["errors"] == 0 and lean["tokens_per_request_min"] == QUICK_OUTPUT_TOKENS and lean["workers"] == 2
        assert "added_ttft_p50_ms" in lean
    loads = data["adapter_loads"]
    for key in ("cold rank 8 (store -> first token)", "cold rank 16 (store -> first token)"):
        assert loads[key]["n"] == 1 and loads[key]["p50_ms"] > 0
    assert loads["warm swap rank 8 (cpu -> gpu slot)"]["n"] + loads["warm swap rank 16 (cpu -> gpu slot)"]["n"] == 3
    assert loads["swap_gpu_misses_reported"] == loads["swap_requests"]  # every warm-swap request missed its slot
    merged = data["merged"]  # one adapter merged into the replica's weights: by RPC, then by the gateway's planner
    assert merged["explicit"]["merge"]["changed"] and merged["explicit"]["merge"]["merged_adapter"].startswith(
        "bench/m0@"
    )
    for path in ("gateway", "direct"):
        level = merged["explicit"]["throughput"][path]
        assert level["errors"] == 0 and level["tokens_per_request_min"] == QUICK_OUTPUT_TOKENS
    assert merged["explicit"]["unmerge"]["changed"] and merged["explicit"]["unmerge"]["merged_adapter"] == ""
    assert merged["automatic"]["merged"], merged["automatic"]
    assert all(p["errors"] == 0 for p in merged["automatic"]["passes"])
    assert data["versions"]["vllm"]


def test_gpu_serving_bench_quick_raw_engine(tmp_path: Path) -> None:
    data = run_bench(tmp_path, "--raw")
    assert data["engine_kwargs"]["enable_lora"] is True and data["engine_kwargs"]["max_loras"] == 2
    assert set(data["throughput"]) == {"base", "1 adapter", "2 adapters", "3 adapters, 2 slots"}
    for row in data["throughput"].values():
        raw = row["raw"]
        assert raw["tokens_per_request_min"] == raw["tokens_per_request_max"] == QUICK_OUTPUT_TOKENS
        assert raw["out_tok_s"] > 0
