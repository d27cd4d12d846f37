"""The training benchmarks' CPU smoke runs: bench/trainer.py reports every case against the baseline, and
bench/seeds_workload.py takes the seeds' job through the worker's real code path to a published adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CASES = ["hf+peft", "hf+peft +gc", "ours", "ours +gc", "ours packed", "ours packed +gc", "ours packed x2 peft-fwd"]
CASES += ["ours packed nogroup nofuse", "ours packed +compile"]  # +compile: aot_eager here (inductor: minutes on a CPU)
PROFILED = ["ours packed", "ours packed +compile"]
pytestmark = pytest.mark.timeout(900)


def test_trainer_bench_smoke(tmp_path: Path, embedded_model_path: Path) -> None:
    out = tmp_path / "bench.json"
    cases = [*CASES, "ours nf4"]  # QLoRA needs CUDA: reported as skipped, with the reason
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "trainer.py"), "--smoke", "--cases", ",".join(cases)]
        + ["--model", str(embedded_model_path), "--json-out", str(out)]
        + ["--compile-backend", "aot_eager", "--profile", ",".join(PROFILED), "--measure-peak"],
        capture_output=True,
        text=True,
        timeout=800,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "MFU = 4 * N_matmul * tokens/s / peak" in result.stdout
    table = result.stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("case"))
    assert [line[:28].strip() for line in table[header + 1 : header + 1 + len(cases)]] == cases
    data = json.loads(out.read_text())["results"]
    measured = [c for c in data["cases"] if "skipped" not in c]
    assert [c["case"] for c in measured] == CASES
    assert all(c["tok_s"] > 0 and c["peak_bytes"] > 0 for c in measured)
    assert all(c["mfu"] is None for c in measured)  # CPU: no peak FLOP/s given, MFU is n/a
    # --measure-peak: the device's best matmul rate (here fp32 on the CPU), and every case's MFU over it.
    peak = data["measured_peak"]
    assert peak["peak_flops"] == max(s["flops_per_s"] for s in peak["shapes"]) > 0
    for case in measured:
        expected = 4 * data["n_matmul"] * case["tok_s"] / peak["peak_flops"]
        assert case["mfu_measured"] == pytest.approx(expected)
    assert "MFU meas: over the measured float32 matmul peak" in result.stdout
    assert "needs a CUDA GPU" in data["cases"][-1]["skipped"]
    assert data["packs"] < data["rows"] and data["n_matmul"] > data["trainable"] > 0
    # The packing check: one pack of rows equals the same rows padded; attention across rows (the control) does not.
    check = data["models"]["base"]["packing_check"]
    assert check["packed_vs_padded"]["loss_rel"] < 1e-5 and check["packed_vs_padded"]["grad_rel"] < 1e-4
    assert check["leaky_vs_padded"]["grad_rel"] > 100 * max(check["packed_vs_padded"]["grad_rel"], 1e-6)
    # +compile: the warm-up epoch compiled the layers (one graph for all), the timed epoch compiled nothing.
    compiled = next(c for c in measured if c["case"] == "ours packed +compile")
    assert compiled["graphs"] >= 1 and compiled["compile_s"] > 0 and compiled["graphs_in_timed_epoch"] == 0
    assert compiled["compile_failure"] is None
    assert "ours packed +compile: compiled" in result.stdout
    # --profile: micro-batches timed and profiled after the timed epoch (CPU: no GPU kernels, no syncs to count).
    for case in measured:
        if case["case"] not in PROFILED:
            assert "profile" not in case
            continue
        profile = case["profile"]
        assert profile["micro_batches"] >= 1 and profile["wall_ms"] >= profile["host_issue_ms"] > 0
        assert profile["kernel_ms"] is None and profile["top_by"] == "self CPU time"
        assert any(op["name"] == "aten::mm" for op in profile["top"]) and sum(op["share"] for op in profile["top"]) <= 1
        assert f"profile {case['case']}:" in result.stdout


def test_seeds_workload_smoke(tmp_path: Path, embedded_model_path: Path) -> None:
    out = tmp_path / "seeds.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "seeds_workload.py"), "--smoke", "--model", str(embedded_model_path)]
        + ["--work", str(tmp_path / "work"), "--json-out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["files"]["files/alpaca-gpt4-data-zh.jsonl"] == 40  # made-up rows, sampled #5 by the job
    [job] = data["jobs"]
    assert job["error"] == "" and job["packing"] is True
    assert job["training_rows"] == 5 + 5 + 2 and job["rows_dropped"] == 0
    assert job["steps"] >= 1 and job["trained_tokens"] > 0 and job["tokens_per_s"] > 0
    assert job["random_weights_seconds"] is not None  # the weights were made, not read
    phases = job["seconds"]
    for phase in ("read+validate", "tokenize", "model build", "training", "save", "publish", "total"):
        assert phases[phase] > 0, phase
    assert phases["total"] >= phases["training"] + phases["model build"]
    assert {"adapter_model.safetensors", "adapter_config.json", "metadata.json"} <= set(job["adapter_files"])
    assert "phase (seconds)" in result.stdout and "published" in result.stdout


def test_graph_breaks_bench_sees_none_in_our_lora_paths_and_sees_one_put_there(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from lorafleet_trainer import lora_groups

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import graph_breaks

    cpu = torch.device("cpu")
    for variant in ("grouped", "nogroup nofuse"):
        graphs, breaks = graph_breaks.count_breaks(variant, cpu)
        assert graphs >= 1 and not breaks, (variant, breaks)
    outputs = lora_groups.LoraGroup.outputs

    def broken(self: Any, x: Any) -> Any:
        torch._dynamo.graph_break()  # the control: what a non-traceable call in a group would do
        return outputs(self, x)

    monkeypatch.setattr(lora_groups.LoraGroup, "outputs", broken)
    graphs, breaks = graph_breaks.count_breaks("grouped", cpu)
    assert sum(breaks.values()) > 0 and graphs > 2
