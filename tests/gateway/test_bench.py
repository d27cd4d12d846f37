"""bench/gateway.py runs end to end (fake replica + real gateway processes) and prints its table."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str) -> str:
    """bench/<script> with ``args``, from the repository root; its standard output (it must exit 0)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def table_rows(output: str) -> dict[str, list[str]]:
    """The cells of a "|"-separated table, by the first cell."""
    return {line.split("|")[0].strip(): line.split("|")[1:] for line in output.splitlines() if "|" in line}


def test_gateway_bench_quick() -> None:
    """Each level direct, then through a one-process gateway and one with two worker processes, each through
    httpx and through the lean client."""
    lines = run_bench("gateway.py", "--quick", "--gateway-workers", "1,2", "--http-client", "httpx,lean").splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("streams"))
    assert "added TTFT p50/p99" in lines[header] and "ratio" in lines[header]
    rows = [line.split("|")[-1].split() for line in lines[header + 1 :]]
    levels = [tuple(line.split()[:3]) for line in lines[header + 1 :]]
    paths = [(w, c) for w in ("1", "2") for c in ("httpx", "lean")]
    assert levels == [(level, *path) for level in ("1", "16", "64") for path in paths]
    for row in rows:  # direct tok/s, gw tok/s, ratio, errors, gateway CPU per token
        ratio, errors = float(row[2]), int(row[3])
        assert errors == 0 and 0 < ratio < 2


def test_gateway_bench_interleaves_rounds_with_the_bare_relay(tmp_path: Path) -> None:
    """Load from client processes, each level in alternating rounds with its streams started spread out, and the bare
    relay as one more column."""
    out = tmp_path / "rows.json"
    arguments = ["--quick", "--clients", "2", "--concurrency", "1,4", "--requests", "8", "--interleave", "2"]
    arguments += ["--spread-s", "0.02"]  # the streams' first requests 5 ms apart at 4 streams
    arguments += ["--http-client", "httpx,lean"]  # each gateway through both clients: a path each
    run_bench("gateway.py", *arguments, "--bare-relay", "--json-out", str(out))
    rows = json.loads(out.read_text())
    paths = [
        (level, f"{target} {client}") for level in (1, 4) for target in ("1", "bare") for client in ("httpx", "lean")
    ]
    assert [(r["concurrency"], r["target"]) for r in rows] == paths
    for row in rows:
        # every request answered, in two rounds of half the level each, tokens counted through every path
        assert row["errors"] == 0 and row["requests"] == 8 and row["rounds"] == 2 and len(row["round_walls_s"]) == 2
        assert row["direct_tokens_per_s"] > 0 and 0 < row["throughput_ratio"] < 2 and row["spread_s"] == 0.02


def test_gateway_cpu_bench_runs_with_the_bare_relay() -> None:
    """bench/gateway_cpu.py (CPU per request and per token, TTFT at one stream) and its floor, bench/bare_relay.py."""
    arguments = ["--requests", "16", "--rounds", "1", "--single", "2", "--tokens", "8", "--token-delay-ms", "1"]
    rows = table_rows(run_bench("gateway_cpu.py", *arguments, "--bare-relay"))
    assert set(rows) == {"tree", REPO.name, "bare relay"}  # the header, this checkout, the floor
    for name, (per_request, per_token, ttft) in ((k, v) for k, v in rows.items() if k != "tree"):
        # per token is a difference of two runs' CPU (long minus short streams): on a busy machine it can come out
        # below zero, so the smoke run checks that it is a number, and per request that it is positive
        assert float(per_request.split()[0]) > 0 and math.isfinite(float(per_token.split()[0])), name
        assert "ms" in ttft, name


def test_gateway_inprocess_bench_compares_trees() -> None:
    """bench/gateway_inprocess.py (the ASGI app called directly; main-thread CPU) over this checkout and the floor."""
    arguments = ["--rounds", "1", "--requests", "20", "--tokens", "4", "--model", "adapter"]
    rows = table_rows(run_bench("gateway_inprocess.py", "--trees", str(REPO), "bare-relay", *arguments))
    assert set(rows) == {"tree", str(REPO)[-24:], "bare-relay"}
    for name, (per_request, per_token) in ((k, v) for k, v in rows.items() if k != "tree"):
        assert float(per_request.split()[0]) > 0 and math.isfinite(float(per_token.split()[0])), name
