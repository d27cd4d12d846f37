"""bench/trainer.py --smoke runs end to end on the embedded model and reports every case against the baseline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CASES = ["hf+peft", "hf+peft +gc", "ours", "ours +gc", "ours packed", "ours packed +gc"]


def test_trainer_bench_smoke(tmp_path: Path, embedded_model_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "trainer.py"), "--smoke", "--json-out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "MFU = 4 * N_matmul * tokens/s / peak" in result.stdout
    table = result.stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("case"))
    assert [line[:18].strip() for line in table[header + 1 : header + 1 + len(CASES)]] == CASES
    data = json.loads(out.read_text())["results"]
    assert [c["case"] for c in data["cases"]] == CASES
    assert all(c["tok_s"] > 0 and c["peak_bytes"] > 0 for c in data["cases"])
    assert all(c["mfu"] is None for c in data["cases"])  # CPU: no peak FLOP/s given, MFU is n/a
    assert data["packs"] < data["rows"] and data["n_matmul"] > data["trainable"] > 0
