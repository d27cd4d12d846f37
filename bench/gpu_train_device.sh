#!/usr/bin/env bash
# Training measurements on a lent GPU machine (no network), from the repository root, in one `run` call carrying
#   gpu-bundle/train       wheels the trainer needs beyond the image (pydantic, pydantic-settings, minio and its
#                          crypto deps) + bitsandbytes 0.50.2 unpacked (CUDA 13 build only), see docs/benchmarks.md
#   gpu-bundle/tokenizer   qwen25-tokenizer.tar.xz (tokenizer.json + tokenizer_config.json, bench/serving/model.py)
#
#   bash bench/gpu_train_device.sh [--budget-s 525] [--stages bench2048,seeds-packed,seeds-default,bench512]
#   bash bench/gpu_train_device.sh --stages profile,bench2048   # with CASES_2048=..., BENCH2048_LIMIT_S=270 (docs/benchmarks.md)
#   (ROWS_2048=288: a timed epoch three times as long as the default 96 rows give)
#
# Stages, in the order given, each under a time limit that leaves the later ones their share of the budget:
#   bench2048      bench/trainer.py at 2,048 tokens: hf+peft baselines, our loop padded and packed (1-8 packs per
#                  forward, with and without checkpointing), a 24 GB preset under a 22 GB cap, ablations, QLoRA
#   seeds-packed   bench/seeds_workload.py: the seeds' job through the worker, packing on, under a 22 GB cap
#   seeds-default  the same job with our defaults (packing off; cap SEEDS_CAP_GB, default 22); stopped after the step
#                  that passes its deadline
#                  (both seeds stages: SEEDS_ARGS=--compile turns training.compile on)
#   bench512       bench/trainer.py at 512 tokens (only if enough time is left)
#   graph-breaks   (not in the default list) bench/graph_breaks.py: dynamo's graphs and graph breaks in the compiled
#                  decoder layers on this torch, per LoRA code path (a tiny model: seconds)
#   profile        (not in the default list) bench/trainer.py --profile at 2,048 tokens on $CASES_PROFILE (default: two
#                  packs per forward, eager and +compile): wall vs host issue vs GPU kernel time per micro-batch, top
#                  kernels, host-device syncs; compile time of +compile cases ($COMPILE_BACKEND, default inductor)
# Results: $OUT/{env.txt,nvidia-smi.txt,*.json,*.log}; the key lines are printed.
# A CPU dry run of this script's logic (embedded model, tiny sizes, no bundle needed):
#   SMOKE=1 MODEL=.lorafleet/models/smollm2-135m-instruct OUT=/tmp/dry bash bench/gpu_train_device.sh --budget-s 600
#   (+compile cases on a CPU: COMPILE_BACKEND=aot_eager, inductor's C++ compilation takes minutes there)
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
       PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
BUNDLE="${BUNDLE:-gpu-bundle}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
BUDGET=525
MODEL="${MODEL:-qwen2.5-7b}"
SMOKE_ARGS=(); [ "${SMOKE:-0}" = 1 ] && SMOKE_ARGS=(--smoke)
STAGES="bench2048,seeds-packed,seeds-default,bench512"
while [ $# -gt 0 ]; do
  case "$1" in
    --budget-s) BUDGET="$2"; shift 2 ;;
    --stages) STAGES="$2"; shift 2 ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
done
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
limit() { local want=$1 reserve=$2 l; l=$(( $(left) - reserve )); [ "$l" -lt "$want" ] && echo "$l" || echo "$want"; }

[ -d "$BUNDLE/train/wheels" ] && python3 -m pip install -q --no-deps --no-compile --target /tmp/train-site "$BUNDLE"/train/wheels/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/train-site:$PWD/$BUNDLE/train/bnb:$PWD/services/common/src:$PWD/services/trainer/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p /tmp/qwen25-tokenizer && [ -f "$BUNDLE/tokenizer/qwen25-tokenizer.tar.xz" ] && tar -C /tmp/qwen25-tokenizer -xJf "$BUNDLE/tokenizer/qwen25-tokenizer.tar.xz"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader); $(nproc) CPUs"
python3 - > "$OUT/env.txt" 2>&1 <<'EOF'
import importlib, inspect, platform, sys
print("python", platform.python_version())
for name in ["torch", "transformers", "peft", "bitsandbytes", "triton", "pydantic", "pydantic_settings", "minio", "yaml",
             "grpc", "lorafleet_trainer.worker", "lorafleet_trainer.train_loop"]:
    try:
        module = importlib.import_module(name)
        print(f"ok {name} {getattr(module, '__version__', '')}")
    except Exception as exc:
        print(f"MISSING {name}: {type(exc).__name__}: {exc}")
import torch
from lorafleet_trainer.attention import torch_varlen_kernel
try:
    from torch.nn.attention.varlen import varlen_attn
    print("varlen_attn", inspect.signature(varlen_attn))
except ImportError as exc:
    print("varlen_attn: none", exc)
print("our varlen kernel:", "usable" if torch_varlen_kernel() else "none (packed rows keep sdpa + 4D mask)")
print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
import shutil
# Triton builds its launchers with the system C compiler: without one, inductor (training.compile) cannot run
print("C compiler:", next((shutil.which(c) for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
      or "none (inductor cannot compile: +compile cases fall back to eager)")
EOF
grep -E "MISSING|varlen|^ok (torch|transformers|peft|bitsandbytes|triton) |device|compiler" "$OUT/env.txt"

run_stage() {  # name, seconds wanted, command...
  local name=$1 want=$2 lim rc; shift 2
  lim=$(limit "$want" 5)
  if [ "$lim" -lt 45 ]; then say "=== $name skipped: $(left) s left"; return; fi
  say "=== $name (limit ${lim}s)"
  timeout "$lim" "$@" > "$OUT/$name.log" 2> "$OUT/$name.err"
  rc=$?
  [ $rc = 0 ] || { say "$name rc=$rc"; grep -vE "Warning|warn\(" "$OUT/$name.err" | tail -15 | cut -c1-300; }
  cat "$OUT/$name.log"
}

DEFAULT_2048="hf+peft,hf+peft +gc,ours,ours +gc,ours packed,ours packed +gc,ours packed x2 +gc cap22"
DEFAULT_2048="$DEFAULT_2048,ours packed x4 +gc cap22,ours packed x8 +gc,ours packed x2,ours packed +gc peft-fwd"
DEFAULT_2048="$DEFAULT_2048,ours packed +gc mask,ours packed +gc nf4"
CASES_2048="${CASES_2048:-$DEFAULT_2048}"
CASES_512="${CASES_512:-hf+peft,hf+peft +gc,ours +gc,ours packed +gc,ours packed x4 +gc,ours packed x4}"
CASES_PROFILE="${CASES_PROFILE:-ours packed x2,ours packed x2 +compile}"
COMPILE_BACKEND="${COMPILE_BACKEND:-inductor}"
for stage in ${STAGES//,/ }; do
  case $stage in
    bench2048) run_stage bench2048 "${BENCH2048_LIMIT_S:-270}" python3 bench/trainer.py --model "$MODEL" --dummy --seq-len 2048 --rows "${ROWS_2048:-96}" \
                 --batch-size 2 --grad-accum 4 --warmup-rows 32 --cases "$CASES_2048" --compile-backend "$COMPILE_BACKEND" \
                 --json-out "$OUT/bench2048.json" "${SMOKE_ARGS[@]}" ;;
    graph-breaks) run_stage graph-breaks 120 python3 bench/graph_breaks.py ;;
    profile) run_stage profile "${PROFILE_LIMIT_S:-240}" python3 bench/trainer.py --model "$MODEL" --dummy --seq-len 2048 \
                 --rows 48 --batch-size 2 --grad-accum 4 --warmup-rows 16 --no-check --cases "$CASES_PROFILE" --profile \
                 --compile-backend "$COMPILE_BACKEND" --json-out "$OUT/profile.json" "${SMOKE_ARGS[@]}" ;;
    seeds-packed) run_stage seeds-packed "${SEEDS_PACKED_LIMIT_S:-130}" python3 bench/seeds_workload.py --model "$MODEL" \
                 --tokenizer-from /tmp/qwen25-tokenizer --packing on --memory-cap-gb 22 --work /tmp/seeds-packed \
                 --deadline-s "${SEEDS_PACKED_DEADLINE_S:-100}" --json-out "$OUT/seeds-packed.json" "${SMOKE_ARGS[@]}" ${SEEDS_ARGS:-} ;;
    seeds-default) d=$(( $(limit "${SEEDS_DEFAULT_LIMIT_S:-400}" 5) - 35 )); [ $d -lt 30 ] && d=30
               run_stage seeds-default "${SEEDS_DEFAULT_LIMIT_S:-400}" python3 bench/seeds_workload.py --model "$MODEL" \
                 --tokenizer-from /tmp/qwen25-tokenizer --packing off --memory-cap-gb "${SEEDS_CAP_GB:-22}" --work /tmp/seeds-default \
                 --deadline-s "$d" --json-out "$OUT/seeds-default.json" "${SMOKE_ARGS[@]}" ${SEEDS_ARGS:-} ;;
    bench512) [ "$(left)" -ge 100 ] && run_stage bench512 180 python3 bench/trainer.py --model "$MODEL" --dummy --seq-len 512 \
                 --rows 128 --batch-size 4 --grad-accum 2 --warmup-rows 32 --cases "$CASES_512" \
                 --json-out "$OUT/bench512.json" "${SMOKE_ARGS[@]}" || say "=== bench512 skipped: $(left) s left" ;;
    *) say "unknown stage $stage" ;;
  esac
done
say "done; $(nvidia-smi --query-gpu=memory.used --format=csv,noheader)"
