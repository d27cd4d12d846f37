#!/usr/bin/env bash
# On a lent GPU machine, from the repository root, inside one `run` call carrying gpu-bundle/vllm026 and
# gpu-bundle/check/device_install.sh (see bench/gpu_device.sh): tune vLLM's LoRA kernels for this GPU.
#   bash bench/gpu_tune_device.sh [bench/tune_lora_kernels.py arguments...]
#   SCRIPT=bench/lora_grid.py bash bench/gpu_tune_device.sh [its arguments...]   # vLLM's grid vs the tight grid
# Results: $OUT/lora-kernel-configs/ ({gpu}_SHRINK.json, {gpu}_EXPAND_TRUE.json, tuning.json), $OUT/tune.log
set -u
export PYTHONUNBUFFERED=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
BUNDLE="${BUNDLE:-gpu-bundle}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export VLLM_BUNDLE_DIR="$BUNDLE/vllm026"
export PYTHONPATH="${PYTHONPATH:-}:$PWD/services/inference/src"  # lora_floor.py times the replica's fold
source "$BUNDLE/check/device_install.sh"
[ "$VLLM_INSTALLED" = 1 ] || { echo "vLLM bundle not installed"; exit 3; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
timeout "${LIMIT_S:-580}" python3 "${SCRIPT:-bench/tune_lora_kernels.py}" --out "$OUT/lora-kernel-configs" "$@" 2> "$OUT/tune.log"
rc=$?
grep -vE "Warning|warn\(" "$OUT/tune.log" | tail -${LOG_TAIL:-60} | cut -c1-240
exit $rc
