#!/usr/bin/env bash
# On the GPU machine, from the repo root: bash docs/bench-results/merged-mode-gpu/run.sh ARGS... (carry gpu-bundle/vllm026 and gpu-bundle/check/device_install.sh)
set -u
export VLLM_BUNDLE_DIR=gpu-bundle/vllm026
source gpu-bundle/check/device_install.sh
[ "$VLLM_INSTALLED" = 1 ] || { echo "vLLM bundle not installed"; exit 1; }
export PYTHONPATH=$PYTHONPATH:$PWD/services/common/src:$PWD/services/inference/src:$PWD/docs/bench-results/merged-mode-gpu
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
cd /tmp && timeout ${LIMIT_S:-540} python3 $OLDPWD/docs/bench-results/merged-mode-gpu/gpu_merge_check.py --out "$OUT" "$@" > "$OUT/log.txt" 2>&1
rc=$?
grep -E "^\[ *[0-9.]+s\]|Error|error|Traceback" "$OUT/log.txt" | grep -v "DEBUG\|ERROR_LOGGED" | tail -30
sed -n '/^{/,$p' "$OUT/log.txt" | head -150
exit $rc
