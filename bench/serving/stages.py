"""The measurements of bench/gpu_serving.py against running services: throughput passes, latency levels, adapter
loads, and the check of the services' own metrics against the benchmark's count."""

from __future__ import annotations

from typing import Any

from serving import report
from serving.adapters import AdapterSpec
from serving.load import Level, LoadPool
from serving.probe import Sampler, scrape, total
from serving.stack import tree_cpu_seconds

TENANT = "bench"  # the adapters are the tenant's models: store name "bench/m0" is model id "m0" through the gateway


class ServiceBench:
    """The stages, run against one replica (``direct``: host:port) and its gateways (base URLs). ``run`` is
    gpu_serving.Run: its clock and log, its prompts (``prompt_maker``, ``next_seed``) and arguments."""

    def __init__(
        self, run: Any, pool: LoadPool, direct: str, gateways: list[str], keys: tuple[str, str], base: str
    ) -> None:
        self.run, self.pool, self.direct, self.gateways, self.base = run, pool, direct, gateways, base
        self.key, self.admin_key = keys  # a tenant's key for requests; the admin key for the gateway's /metrics
        self.args = run.args
        self.pids: dict[str, int] = {}  # front-end processes whose CPU use is recorded per pass (with children)
        self.gateway_workers = [1] * len(gateways)  # each gateway's worker processes
        self.latency_adapter = ""  # store name of an adapter whose latency levels run too (direct); "" = none
        self.bare = ""  # base URL of bench/bare_relay.py in front of the replica, measured as one more path; "" = none

    def measured(self, path: str, calls: list[tuple[str, str]], max_tokens: int, concurrency: int, **kw: Any) -> Any:
        """``level`` plus the share of a core each front-end process (inference gRPC + vLLM's output handling,
        gateways) used meanwhile: near 1.0 means that process, not the GPU, set the pace."""
        before = {name: tree_cpu_seconds(pid) for name, pid in self.pids.items()}
        level = self.level(path, calls, max_tokens, concurrency, **kw)
        row = report.summarize(level)
        for name, pid in self.pids.items():
            start, end = before[name], tree_cpu_seconds(pid)
            if start is not None and end is not None and level.wall_s:
                row[f"cpu_share_{name}"] = (end - start) / level.wall_s
        return row

    def level(
        self,
        path: str,
        calls: list[tuple[str, str]],
        max_tokens: int,
        concurrency: int,
        all_gw: bool = False,
        gateway: int = 0,
        http_client: str = "httpx",
    ) -> Level:
        """One level of load; ``calls`` name adapters by store name ("" = base), mapped to the gateway's ids.
        Through the gateway numbered ``gateway``, or spread over all of them (``all_gw``), with ``http_client``
        (serving/load.py's Job)."""
        if path == "direct":
            return self.pool.run("direct", self.direct, calls, max_tokens, concurrency)
        http = {"base_model": self.base, "http_client": http_client}
        if path == "bare":  # the replica's store names as models, no key: the relay does neither tenancy nor auth
            return self.pool.run("gateway", [self.bare], calls, max_tokens, concurrency, key="-", **http)
        model_ids = [(a.removeprefix(f"{TENANT}/"), p) for a, p in calls]
        targets = self.gateways if all_gw else self.gateways[gateway : gateway + 1]
        return self.pool.run("gateway", targets, model_ids, max_tokens, concurrency, key=self.key, **http)

    def prompts(self, count: int, tokens: int | None = None) -> list[str]:
        return self.run.prompt_maker.prompts(count, tokens or self.args.prompt_tokens, self.run.next_seed())

    def warm_up(self, mix: list[AdapterSpec]) -> None:
        for path in ("direct", "gateway", *(["bare"] if self.bare else [])):
            self.level(path, [("", p) for p in self.prompts(4, 16)], 4, 4)
            self.level(path, [(mix[0].name, p) for p in self.prompts(2, 16)], 4, 2)

    def throughput(self, case: str, adapters: list[str], metrics_url: str, gateway_metrics: str) -> dict[str, Any]:
        n, out = self.args.requests, self.args.output_tokens

        def calls() -> list[tuple[str, str]]:
            return [(adapters[i % len(adapters)] if adapters else "", p) for i, p in enumerate(self.prompts(n))]

        row: dict[str, Any] = {}
        first = self.level("gateway", calls(), out, n)  # loads adapters, fills caches, JIT of new kernel shapes
        row["first_pass"] = report.summarize(first)
        before, gw_before = scrape(metrics_url), scrape(gateway_metrics, self.admin_key)
        with Sampler(metrics_url, 0.5) as sampler:
            row["gateway"] = self.measured("gateway", calls(), out, n)
        after, gw_after = scrape(metrics_url), scrape(gateway_metrics, self.admin_key)
        tokens = row["gateway"]["out_tokens"]
        row["gateway"]["check"] = metrics_check(tokens, before, after, gw_before, gw_after, sampler.rows)
        row["direct"] = self.measured("direct", calls(), out, n)
        # Each further gateway alone (e.g. one with worker processes against the first's one), then all at once.
        row["more_gateways"] = [
            self.measured("gateway", calls(), out, n, gateway=i) | {"workers": self.gateway_workers[i]}
            for i in range(1, len(self.gateways))
        ]
        if len(self.gateways) > 1 and not adapters:
            row["gateway_all"] = self.measured("gateway", calls(), out, n, all_gw=True)
        if self.bare:
            row["bare"] = self.measured("bare", calls(), out, n)
        more = "".join(
            f", gateway {i + 1} ({r['workers']} workers) {r['out_tok_s']:.0f}"
            for i, r in enumerate(row["more_gateways"])
        )
        bare = f", bare relay {row['bare']['out_tok_s']:.0f}" if "bare" in row else ""
        self.run.log(
            f"{case}: gateway {row['gateway']['out_tok_s']:.0f} tok/s, direct {row['direct']['out_tok_s']:.0f} tok/s"
            f"{more}{bare} (first pass {row['first_pass']['out_tok_s']:.0f})"
        )
        return row

    def latency(self, streams: int, requests: int, gateways: int = 1) -> dict[str, Any]:
        """Direct, then through each of the first ``gateways`` gateways: "gateway" is the first, "more_gateways"
        the others (each with its worker count), every one with its time added to direct's."""
        row: dict[str, Any] = {}

        def through(path: str, gateway: int = 0, adapter: str = "", http_client: str = "httpx") -> dict[str, Any]:
            calls = [(adapter, p) for p in self.prompts(requests)]
            level = self.level(path, calls, self.args.output_tokens, streams, gateway=gateway, http_client=http_client)
            level = report.summarize(level)
            if path == "gateway":
                for q in ("p50", "p99"):
                    for metric in ("ttft", "tpot"):
                        key = f"{metric}_{q}_ms"
                        level[f"added_{key}"] = level[key] - row["direct"][key]
            return level

        row["direct"] = through("direct")
        if self.latency_adapter:  # the same level on one adapter, direct: what LoRA adds to each token
            row["direct_adapter"] = through("direct", adapter=self.latency_adapter) | {"adapter": self.latency_adapter}
        row["gateway"] = through("gateway")
        row["gateway"]["workers"] = self.gateway_workers[0]
        if self.args.latency_lean_client:  # the same gateway, the client's own cost left out
            row["gateway_lean"] = through("gateway", http_client="lean") | {"workers": self.gateway_workers[0]}
        row["more_gateways"] = [
            through("gateway", i) | {"workers": self.gateway_workers[i]} for i in range(1, gateways)
        ]
        for q in ("p50", "p99"):  # the first gateway's, where earlier runs' results have them
            row[f"added_ttft_{q}_ms"] = row["gateway"][f"added_ttft_{q}_ms"]
            row[f"added_tpot_{q}_ms"] = row["gateway"][f"added_tpot_{q}_ms"]
        added = ", ".join(f"{g['added_ttft_p50_ms']:.1f}" for g in (row["gateway"], *row["more_gateways"]))
        self.run.log(f"latency {streams} streams: added TTFT p50 {added} ms")
        return row

    def sequential_ttft(self, names: list[str]) -> list[float]:
        """One request after another (max_tokens=1, direct), in order; their times to first token."""
        level = self.pool.run(
            "direct", self.direct, [(a, p) for a, p in zip(names, self.prompts(len(names)), strict=True)], 1, 1
        )
        if level.errors:
            raise SystemExit(f"adapter-load requests failed: {level.errors[:3]}")
        by_start = sorted(level.samples, key=lambda s: s.start)
        return [s.ttft for s in by_start]

    def adapter_loads(
        self, mix: list[AdapterSpec], cold8: list[AdapterSpec], cold16: list[AdapterSpec], metrics_url: str
    ) -> dict[str, Any]:
        rows: dict[str, list[float]] = {}
        n = self.args.samples
        rows["base model"] = self.sequential_ttft([""] * n)
        rows["adapter in a GPU slot"] = self.sequential_ttft([mix[0].name] * n)
        for label, specs in (("rank 8", cold8), ("rank 16", cold16)):
            cold, again = [], []
            for spec in specs:  # first request (store -> disk -> engine -> slot), then the same adapter again
                first, second = self.sequential_ttft([spec.name, spec.name])
                cold.append(first)
                again.append(second)
            rows[f"cold {label} (store -> first token)"] = cold
            rows[f"cold {label}, next request"] = again
            rows[f"cold {label}: load cost (cold - next)"] = [a - b for a, b in zip(cold, again, strict=True)]
        # Warm swap: a round robin over max_loras + 1 registered adapters, one request at a time; under vLLM's LRU
        # every request finds its adapter pushed out of the slots since its last use (registered: cpu tier).
        ring = [s.name for s in cold16] + [s.name for s in mix[: self.args.max_loras + 1 - len(cold16)]]
        ranks = {s.name: s.rank for s in (*mix, *cold16)}
        self.sequential_ttft(ring)  # sets the order up
        misses = total(scrape(metrics_url), "lorafleet_adapter_cache_misses_total", tier="gpu")
        order = ring * self.args.swap_rounds
        swaps = self.sequential_ttft(order)
        misses = total(scrape(metrics_url), "lorafleet_adapter_cache_misses_total", tier="gpu") - misses
        slot = report.pct(rows["adapter in a GPU slot"], 0.5)
        for rank in (8, 16):
            values = [t for name, t in zip(order, swaps, strict=True) if ranks[name] == rank]
            if values:
                rows[f"warm swap rank {rank} (cpu -> gpu slot)"] = values
                rows[f"warm swap rank {rank}: cost (swap - in slot p50)"] = [t - slot for t in values]
        result: dict[str, Any] = {
            k: {"p50_ms": report.pct(v, 0.5) * 1000, "p95_ms": report.pct(v, 0.95) * 1000, "n": len(v)}
            for k, v in rows.items()
        }
        result["swap_ring"] = len(ring)
        result["swap_requests"] = len(order)
        result["swap_gpu_misses_reported"] = misses
        return result


def metrics_check(
    counted: int, before: Any, after: Any, gw_before: Any, gw_after: Any, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """The replica's and the gateway's token counters over the pass against our count; GPU memory metric vs
    nvidia-smi at the same instants."""
    name = "lorafleet_generation_tokens_total"
    replica = total(after, name) - total(before, name)
    gw = total(gw_after, "lorafleet_gateway_tokens_total", kind="completion") - total(
        gw_before, "lorafleet_gateway_tokens_total", kind="completion"
    )
    memory = [
        abs(r["metric_gpu_used_bytes"] - r["smi_used_bytes"]) / r["smi_used_bytes"]
        for r in rows
        if r["smi_used_bytes"] and r["metric_device"] != "cpu"
    ]
    return {
        "bench_tokens": counted,
        "replica_metric_tokens": replica,
        "gateway_metric_tokens": gw,
        "replica_vs_bench": replica / counted - 1 if counted else None,
        "gateway_vs_bench": gw / counted - 1 if counted else None,
        "gpu_memory_samples": len(memory),
        "gpu_memory_max_rel_diff": max(memory) if memory else None,
        "gpu_memory_metric_gib": rows[-1]["metric_gpu_used_bytes"] / 2**30 if rows else None,
        "gpu_memory_smi_gib": (rows[-1]["smi_used_bytes"] or 0) / 2**30 if rows else None,
        "gpu_util_pct_max": max((r["smi_util_pct"] or 0 for r in rows), default=None),
    }
