"""Summaries of load levels (percentiles, rates) and the text report of a run."""

from __future__ import annotations

import math
from typing import Any

from serving.load import Level


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# Where in a pass the requests' first and last tokens fall: comparing these between two paths tells a late start
# (the first tokens later, the same spread) from a slow relay (the gap growing towards the end).
TIMELINE_QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def summarize(level: Level) -> dict[str, Any]:
    ok = [s for s in level.samples if not s.error]
    t0 = min((s.start for s in ok), default=0.0)
    tpot = [(s.total - s.ttft) / (s.tokens - 1) for s in ok if s.tokens > 1]
    gaps = [g for s in ok for g in s.gaps]
    ms = 1000.0
    return {
        "requests": len(level.samples),
        "errors": len(level.errors),
        "first_errors": level.errors[:3],
        "wall_s": level.wall_s,
        "out_tokens": level.tokens,
        "out_tok_s": level.tokens / level.wall_s if level.wall_s else 0.0,
        "req_s": len(ok) / level.wall_s if level.wall_s else 0.0,
        "tokens_per_request_min": min((s.tokens for s in ok), default=0),
        "tokens_per_request_max": max((s.tokens for s in ok), default=0),
        "ttft_p50_ms": pct([s.ttft for s in ok], 0.5) * ms,
        "ttft_p95_ms": pct([s.ttft for s in ok], 0.95) * ms,
        "ttft_p99_ms": pct([s.ttft for s in ok], 0.99) * ms,
        "tpot_p50_ms": pct(tpot, 0.5) * ms,
        "tpot_p99_ms": pct(tpot, 0.99) * ms,
        "gap_p50_ms": pct(gaps, 0.5) * ms,
        "gap_p99_ms": pct(gaps, 0.99) * ms,
        "latency_p50_ms": pct([s.total for s in ok], 0.5) * ms,
        "client_cpu_share_max": max(level.client_cpu_s) / level.wall_s if level.wall_s else 0.0,
        "start_skew_ms": level.start_skew_s * ms,
        "timeline_quantiles": list(TIMELINE_QUANTILES),  # seconds from the first request sent:
        "first_token_at_s": [pct([s.start - t0 + s.ttft for s in ok], q) for q in TIMELINE_QUANTILES],
        "end_at_s": [pct([s.start - t0 + s.total for s in ok], q) for q in TIMELINE_QUANTILES],
    }


def passes(row: dict[str, Any], paths: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    """A throughput case's passes by label: those of ``paths`` it has, then each further gateway alone."""
    named = [(path, row[path]) for path in paths if path in row]
    return named + [(f"gw{i + 1} x{r['workers']}", r) for i, r in enumerate(row.get("more_gateways", []))]


def other_gateway_line(label: str, r: dict[str, Any]) -> str:
    """A latency level through another gateway path, under its level's first line."""
    return (
        f"{'':>12}{label}: TTFT {r['ttft_p50_ms']:.1f}/{r['ttft_p99_ms']:.1f} TPOT {r['tpot_p50_ms']:.2f}/"
        f"{r['tpot_p99_ms']:.2f} | added TTFT {r['added_ttft_p50_ms']:.1f}/{r['added_ttft_p99_ms']:.1f}"
    )


def text(results: dict[str, Any]) -> str:
    lines = [f"== {results.get('title', 'serving benchmark')}"]
    for key in ("versions", "hardware", "engine"):
        if key in results:
            lines.append(f"{key}: {results[key]}")
    if "startup" in results:
        lines.append(f"startup: {results['startup']}")
    tp = results.get("throughput", {})
    if tp:
        lines.append("")
        lines.append("(a/b) throughput: all requests submitted at once")
        lines.append(f"{'case':<26}{'path':<10}{'out tok/s':>10}{'req/s':>8}{'tok/req':>12}{'TTFT p50':>10}{'err':>5}")
        for case, row in tp.items():
            for path, r in passes(row, ("gateway", "gateway_all", "bare", "direct", "raw")):
                span = f"{r['tokens_per_request_min']}-{r['tokens_per_request_max']}" if "ttft_p50_ms" in r else ""
                ttft = f"{r['ttft_p50_ms']:.0f} ms" if "ttft_p50_ms" in r else ""
                lines.append(
                    f"{case:<26}{path:<10}{r['out_tok_s']:>10.0f}{r['req_s']:>8.1f}{span:>12}{ttft:>10}"
                    f"{r.get('errors', 0):>5}"
                )
        lines.append("")
        lines.append(f"when tokens came, s from the pass's first request at quantiles {list(TIMELINE_QUANTILES)}")
        for case, row in tp.items():
            for path, r in passes(row, ("gateway", "gateway_all", "bare", "direct")):
                if "first_token_at_s" in r:
                    first = " ".join(f"{t:.2f}" for t in r["first_token_at_s"])
                    end = " ".join(f"{t:.2f}" for t in r["end_at_s"])
                    lines.append(f"{case:<26}{path:<10} first token {first} | last token {end}")
    lat = results.get("latency", {})
    if lat:
        lines.append("")
        lines.append("(d) latency, base model (ms): TTFT p50/p99, time per output token p50/p99, gateway - direct")
        for level, row in lat.items():
            d, g = row["direct"], row["gateway"]
            lines.append(
                f"streams {level:>3}: direct TTFT {d['ttft_p50_ms']:.1f}/{d['ttft_p99_ms']:.1f} "
                f"TPOT {d['tpot_p50_ms']:.2f}/{d['tpot_p99_ms']:.2f} | gateway TTFT {g['ttft_p50_ms']:.1f}/"
                f"{g['ttft_p99_ms']:.1f} TPOT {g['tpot_p50_ms']:.2f}/{g['tpot_p99_ms']:.2f} | added TTFT "
                f"{row['added_ttft_p50_ms']:.1f}/{row['added_ttft_p99_ms']:.1f}"
                f" ({g.get('workers', 1)} worker{'s' if g.get('workers', 1) > 1 else ''})"
            )
            if "direct_adapter" in row:
                a = row["direct_adapter"]
                lines.append(
                    f"{'':>12}one adapter, direct: TTFT {a['ttft_p50_ms']:.1f}/{a['ttft_p99_ms']:.1f} "
                    f"TPOT {a['tpot_p50_ms']:.2f}/{a['tpot_p99_ms']:.2f}"
                )
            if "gateway_lean" in row:
                lines.append(other_gateway_line("same gateway, lean HTTP client", row["gateway_lean"]))
            for more in row.get("more_gateways", []):
                workers = f"{more['workers']} worker{'s' if more['workers'] > 1 else ''}"
                lines.append(other_gateway_line(f"another gateway ({workers})", more))
    loads = results.get("adapter_loads", {})
    if loads:
        lines.append("")
        lines.append("(c) adapter loads, one request at a time, max_tokens=1 (ms)")
        for key, row in loads.items():
            if isinstance(row, dict) and "p50_ms" in row:
                lines.append(f"{key:<34} p50 {row['p50_ms']:8.1f}  p95 {row['p95_ms']:8.1f}  n {row['n']}")
    lines += merged_lines(results.get("merged", {}), tp)
    checks = {case: row["gateway"]["check"] for case, row in tp.items() if "check" in row.get("gateway", {})}
    if checks:
        lines.append("")
        lines.append("(e) the services' metrics during the gateway passes: tokens counted, GPU memory vs nvidia-smi")
        for case, c in checks.items():
            diff = c["gpu_memory_max_rel_diff"]
            lines.append(
                f"{case:<26} bench {c['bench_tokens']}, replica {c['replica_metric_tokens']:.0f}, gateway "
                f"{c['gateway_metric_tokens']:.0f}; GPU memory max diff "
                + (f"{diff:.2%} over {c['gpu_memory_samples']} samples" if diff is not None else "n/a (no GPU)")
            )
    return "\n".join(lines)


def merged_lines(merged: dict[str, Any], tp: dict[str, Any]) -> list[str]:
    """(f): the merged adapter's passes next to the base model and the same adapter through LoRA."""
    if not merged:
        return []
    lines = ["", "(f) one adapter merged into the replica's weights (no LoRA), out tok/s and / the base model's"]
    explicit = merged.get("explicit")
    if explicit:
        for label in ("merge", "unmerge"):
            sw = explicit[label]
            lines.append(
                f"{label:<8} {sw['wall_s']:.2f} s (drain {sw['drain_s']:.2f} s, weights {sw['merge_s']:.2f} s)"
            )
        for path in ("gateway", "direct"):
            got = explicit["throughput"][path]["out_tok_s"]
            base = tp.get("base", {}).get(path, {}).get("out_tok_s")
            lora = tp.get("1 adapter", {}).get(path, {}).get("out_tok_s")
            vs = f"  base {base:.0f} ({got / base:.2f})" if base else ""
            vs += f"  LoRA {lora:.0f} ({lora / base:.2f})" if lora and base else ""
            lines.append(f"merged   {path:<8} {got:>8.0f}{vs}  errors {explicit['throughput'][path]['errors']}")
    auto = merged.get("automatic")
    if auto:
        after = auto["merged_after_s"]
        passes = ", ".join(f"{p['out_tok_s']:.0f} ({p['errors']} err)" for p in auto["passes"])
        lines.append(
            "planner  "
            + (f"merged {after:.1f} s after the first request" if after is not None else "did not merge")
            + f"; passes through it: {passes} tok/s"
        )
    return lines
