"""bench/inference.py --quick runs end to end (its own engine, in a subprocess) and reports every measurement."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]


def test_inference_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "inference.py"), "--quick", "--json-out", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for heading in ("(a) throughput", "(b) time to first token", "(c) our service over gRPC"):
        assert heading in result.stdout, result.stdout
    data = json.loads(out.read_text())["results"]
    assert set(data["throughput"]) == {"0", "1", "2", "4"}
    assert all(case["tok_s"] > 0 and case["tokens"] > 0 for case in data["throughput"].values())
    assert set(data["latency"]) == {"base", "slot", "swap", "disk", "cold"}
    assert all(row["p50"] > 0 and row["n"] >= 1 for row in data["latency"].values())
    assert data["swap_gpu_misses"] == data["latency"]["swap"]["n"]  # every "warm swap" really missed its slot
    for side in ("service", "engine"):
        assert all(math.isfinite(v) and v > 0 for v in data["overhead"][side].values())


def test_lora_mixed_check_runs_the_replicas_engine_with_adapters_beside_base_model_requests(tmp_path: Path) -> None:
    """bench/lora_mixed_check.py on the CPU build (no CUDA graphs there: what it checks on a GPU is in
    docs/benchmarks.md): every request of a mix gives the tokens it gave alone, and the adapters change them; with
    one-adapter steps folded into the base GEMMs (lora_fold.py, asked for: off by default on CPU) too, with and
    without the steps of two adapters folded (lora_fold_multi.py)."""
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "lora_mixed_check.py"),
            "--variants",
            "ours,ours-fold,ours-fold-one",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "mixed_check.json").read_text())
    for name, folded, several in (("ours", False, False), ("ours-fold", True, True), ("ours-fold-one", True, False)):
        variant = results[name]
        assert variant["folded"] is folded and variant["folded_several"] is several, name
        assert variant["right_up_to_ties"] and variant["adapters_change_output"], name
        assert len(variant["rows"]) == 8
        base_rows = [row for row in variant["rows"] if row["request"].endswith("@base")]
        adapter_rows = [row for row in variant["rows"] if not row["request"].endswith("@base")]
        assert len(base_rows) == 3 and all(row["as_base"] == 24 for row in base_rows)
        assert all(row["as_base"] < 24 for row in adapter_rows)
    assert results["ours"]["right"] and all(row["as_alone"] == 24 for row in results["ours"]["rows"])
    # the folded adapter requests alone match vLLM's own LoRA path, up to a tied token (float32 here: none seen)
    for request, tokens in results["ours-fold"]["alone"].items():
        assert tokens[:8] == results["ours"]["alone"][request][:8], request
